"""A dataset ready to be written as shards: what every source module (digits, CIFAR-10, folder) returns."""

from __future__ import annotations

from collections import Counter
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
    skipped: tuple[tuple[str, str], ...] = ()
    """(reason, name) of each input left out, e.g. (".txt", "cat/notes.txt") or ("hidden", ".DS_Store")."""


def skipped_summary(skipped: tuple[tuple[str, str], ...], show: int = 3) -> str:
    """One line: `skipped 3 files: 2 .txt, 1 hidden (a.txt, b/c.txt, .DS_Store)`; "" when nothing was skipped."""
    if not skipped:
        return ""
    reasons = Counter(reason for reason, _ in skipped)
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    names = ", ".join(name for _, name in skipped[:show]) + (", ..." if len(skipped) > show else "")
    return f"skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''}: {parts} ({names})"


def array_source(name: str, desc: str, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> Source:
    """A Source over in-memory arrays."""
    samples = ((images[i], int(labels[i])) for i in range(len(images)))
    return Source(name, desc, tuple(images.shape[1:]), len(images), names, samples)  # type: ignore[arg-type]
