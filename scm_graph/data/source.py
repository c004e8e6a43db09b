"""A dataset ready to be written as shards: what every source module (digits, CIFAR-10, folder) returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass
class Source:
    """A dataset ready to be written: uint8 CHW images with optional labels."""

    name: str
    """Default shard set name."""
    description: str
    """Where it came from (stored as the manifest's `source`)."""
    shape: tuple[int, int, int]
    count: int
    class_names: tuple[str, ...] | None
    """None = unlabelled."""
    samples: Iterable[tuple[np.ndarray, int | None]]
    """`count` pairs of (uint8 [C, H, W], label or None)."""


def array_source(name: str, desc: str, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> Source:
    """A Source over in-memory arrays."""
    samples = ((images[i], int(labels[i])) for i in range(len(images)))
    return Source(name, desc, tuple(images.shape[1:]), len(images), names, samples)  # type: ignore[arg-type]
