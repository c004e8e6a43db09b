"""Feature networks behind the Frechet metrics, one interface: uint8 images [N, C, H, W] -> features [N, dim].

| metric      | network                              | preprocessing (inside the network object)           | ref          |
|-------------|--------------------------------------|------------------------------------------------------|--------------|
| `fd_digits` | our digits classifier (64 features)  | x / 127.5 - 1 on the 8x8 digits                      | built in     |
| `fid`       | clean-fid's Inception (2048, pool3)  | clean-fid's "clean" PIL bicubic resize to 299        | `--ref` file |
| `fd_dinov2` | DINOv2 ViT-L/14 (1024, CLS)          | EDM2's: bicubic antialiased resize to 224, ImageNet mean / std | `--ref` file |

Weights are local files only (`FeatureWeights`); nothing is downloaded. `scm_graph.eval.registry` builds
the network of a metric. Each metric's result is logged under
its `column` (`fd` for the digits, as before this module existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from scm_graph.errors import UserError

METRICS = ("fd_digits", "fid", "fd_dinov2")
COLUMN = {"fd_digits": "fd", "fid": "fid", "fd_dinov2": "fd_dinov2"}  # the metric's key in tables, JSON and metrics.jsonl


@dataclass(frozen=True)
class FeatureWeights:
    """Where the feature networks' weights are (local paths; empty = the default place)."""

    inception: str = ""
    """The folder holding inception-2015-12-05.pt (or the file itself); empty = clean-fid's own place, /tmp."""
    dinov2: str = ""
    """A local copy of the facebookresearch/dinov2 repository (its hubconf.py) holding dinov2_vitl14_pretrain.pth."""


class FeatureNet(Protocol):
    metric: str
    dim: int

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 images [N, C, H, W] (C = 1 or 3) -> features [N, dim] (any float dtype, any device)."""
        ...


def check_metrics(metrics: list[str] | tuple[str, ...]) -> None:
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise UserError(f"a metric is listed twice: {' '.join(metrics)}")


def rgb(images: Tensor) -> Tensor:
    """[N, 1 or 3, H, W] -> [N, 3, H, W] (grey repeated, as clean-fid and EDM2 do)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
