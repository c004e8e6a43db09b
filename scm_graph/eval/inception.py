"""FID features through clean-fid: its TorchScript Inception-v3 (pool3, 2048) and its "clean" resize.

clean-fid's `InceptionV3W` loads `inception-2015-12-05.pt` (the TensorFlow FID network as TorchScript) from a
folder; we always pass `download=False`. Each image is resized by clean-fid's own resizer for mode "clean"
(PIL bicubic on float32 channels to 299 x 299, no quantisation after), then `InceptionV3W` normalises
(x - 128) / 128 and returns the pool3 features: exactly what `cleanfid.fid.compute_fid(..., mode="clean")`
does for a folder of PNGs of the same uint8 images.

clean-fid needs torchvision at install time (`pip install clean-fid`); the two modules used here import
without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scm_graph.errors import UserError
from scm_graph.eval.features import rgb

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_FOLDER = "/tmp"  # where clean-fid itself keeps the file on Linux and macOS


def inception_file(path: str = "", flag: str = "--inception") -> Path:
    """The Inception weights: `path` (a folder holding inception-2015-12-05.pt, or the file), else clean-fid's /tmp copy."""
    p = Path(path or CLEANFID_FOLDER).expanduser()
    f = p if p.suffix == ".pt" else p / INCEPTION_FILE
    if not f.is_file():
        where = f"put it in {f.parent}" if path else f"put it in a folder and pass the folder as {flag}"
        raise UserError(f"the FID Inception weights {f} are missing: download {INCEPTION_URL} and {where} "
                        "(nothing is downloaded at run time)")
    if f.name != INCEPTION_FILE:
        raise UserError(f"clean-fid loads the Inception weights by the name {INCEPTION_FILE}, not {f.name}")
    return f


def _cleanfid():
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError as e:
        raise UserError(f"FID needs clean-fid ({e.name} did not import): pip install clean-fid (scm_graph's 'fid' extra; it brings torchvision)") from None
    return InceptionV3W, build_resizer


class InceptionFeatures:
    """clean-fid's Inception features of uint8 images, resized the clean-fid way."""

    metric, dim = "fid", 2048

    def __init__(self, path: str = "", device: torch.device | str = "cpu") -> None:
        f = inception_file(path)
        InceptionV3W, build_resizer = _cleanfid()
        try:
            self.net = InceptionV3W(str(f.parent), download=False, resize_inside=False).to(device).eval()
        except RuntimeError as e:  # not a TorchScript file
            raise UserError(f"{f} is not clean-fid's TorchScript Inception ({str(e).splitlines()[0]})") from None
        self.resize = build_resizer("clean")  # PIL bicubic per float32 channel to 299 x 299
        self.device = torch.device(device)

    def resized(self, images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float32 [N, 3, 299, 299] in 0..255, per clean-fid's "clean" mode."""
        hwc = rgb(images).permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(np.stack([self.resize(im) for im in hwc])).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net(self.resized(images).to(self.device))
