"""Sample grids: cell placement, upscaling and separators."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scm_graph.sample.grid import save_grid


@pytest.mark.parametrize("n,nrow,c,h,min_side,size", [
    (10, 4, 1, 8, 64, (4 * 65 + 1, 3 * 65 + 1)),  # 3 rows of 4, 8 px upscaled x8
    (10, None, 1, 8, 64, (4 * 65 + 1, 3 * 65 + 1)),  # default nrow = ceil(sqrt(n))
    (64, None, 1, 8, 64, (8 * 65 + 1, 8 * 65 + 1)),
    (3, 5, 3, 8, 16, (5 * 17 + 1, 1 * 17 + 1)),  # x2
    (4, 2, 3, 32, 64, (2 * 65 + 1, 2 * 65 + 1)),  # 32 px -> 64 px
    (2, 1, 3, 32, 16, (33 + 1, 2 * 33 + 1)),  # already large enough: no upscaling
    (1, None, 1, 8, 8, (10, 10)),
])
def test_save_grid_dimensions(tmp_path: Path, n, nrow, c, h, min_side, size):
    imgs = torch.randint(0, 256, (n, c, h, h), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = tmp_path / "sub" / "grid.png"
    save_grid(imgs, p, nrow=nrow, min_side=min_side, pad=1)
    with Image.open(p) as im:
        assert im.size == size and im.mode == ("L" if c == 1 else "RGB")
        arr = np.asarray(im)
    scale = max(1, min_side // h)
    s = h * scale
    if c == 1:
        arr = arr[..., None]
    per_row = nrow or math.ceil(math.sqrt(n))
    for i in range(n):  # every cell holds its image, upscaled by pixel repetition
        r, q = divmod(i, per_row)
        cell = arr[1 + r * (s + 1): 1 + r * (s + 1) + s, 1 + q * (s + 1): 1 + q * (s + 1) + s]
        want = imgs[i].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(cell, want), i
    assert (arr[0] == 255).all() and (arr[:, 0] == 255).all()  # white padding


def test_save_grid_default_pad_grows_with_upscaling(tmp_path: Path):
    imgs = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    save_grid(imgs, tmp_path / "g.png", nrow=2, min_side=64)  # x8 upscaling -> 4 px separators
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * 68 + 4, 2 * 68 + 4)
        arr = np.asarray(im)
    assert (arr[:4] == 255).all() and (arr[4:68, 4:68] == 0).all()
