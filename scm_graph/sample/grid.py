"""Sample grids as PNG: uint8 images tiled with white separators, tiny images upscaled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import Tensor

from scm_graph.paths import write_atomic


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, min_side: int = 64, pad: int | None = None) -> None:
    """Save uint8 [N, C, H, W] as one PNG grid; tiny images are upscaled (nearest) to `min_side`.

    Cells are separated by `pad` white pixels (default: half the upscale factor, at least 1).
    """
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = max(1, min_side // h)
    pad = max(1, scale // 2) if pad is None else pad
    H, W = h * scale, w * scale
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, c), 255, dtype=np.uint8)
    imgs = images.permute(0, 2, 3, 1).numpy().repeat(scale, 1).repeat(scale, 2)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + q * (W + pad) : pad + q * (W + pad) + W] = imgs[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    write_atomic(path, lambda f: image.save(f, format="PNG"))
