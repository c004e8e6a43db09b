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


def digits_source() -> Source:
    """sklearn's 8x8 digits (1x8x8, labels 0..9)."""
    images, labels = load_digits_uint8()
    return array_source("digits", "sklearn.datasets.load_digits", images, labels, tuple(str(i) for i in range(10)))
