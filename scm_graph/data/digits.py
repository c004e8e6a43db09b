"""scikit-learn's embedded 8x8 handwritten digits (1797 images, 10 classes): the offline data set of the tests and the quick start."""

from __future__ import annotations

import numpy as np

from scm_graph.data.source import Source, array_source


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 1, 8, 8] in 0..255, labels int64 [N]); N = 1797.

    sklearn stores gray levels 0..16; we map them to 0..255 by round(v * 255 / 16).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return images, d.target.astype(np.int64)


SPLITS = ("all", "train", "heldout")
N_HELDOUT = 297  # held back from training (the digits' last sixth), for FD against images no model has seen
SPLIT_SEED = 0


def split_indices(split: str, n: int = 1797) -> np.ndarray:
    """The images of a split, in their original order: 'all'; 'train' and 'heldout' partition a fixed permutation
    (numpy's generator seeded SPLIT_SEED), the held-out set its last N_HELDOUT."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}")
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[: n - N_HELDOUT] if split == "train" else perm[n - N_HELDOUT:])


def set_name(split: str) -> str:
    """The shard set's default name: 'digits', 'digits-train' or 'digits-heldout'."""
    return "digits" if split == "all" else f"digits-{split}"


def digits_source(split: str = "all") -> Source:
    """sklearn's 8x8 digits (1x8x8, labels 0..9), all of them or one split (`split_indices`)."""
    images, labels = load_digits_uint8()
    keep = split_indices(split, len(images))
    desc = "sklearn.datasets.load_digits" + ("" if split == "all" else f" ({split} split: {len(keep)} of {len(images)}, seed {SPLIT_SEED})")
    return array_source(set_name(split), desc, images[keep], labels[keep], tuple(str(i) for i in range(10)))
