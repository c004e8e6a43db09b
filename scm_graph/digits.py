"""scikit-learn's embedded 8x8 handwritten digits as uint8 images (the offline test dataset)."""

from __future__ import annotations

import numpy as np


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 1, 8, 8] in 0..255, labels int64 [N]); N = 1797.

    sklearn stores gray levels 0..16; we map them to 0..255 by round(v * 255 / 16).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return images, d.target.astype(np.int64)
