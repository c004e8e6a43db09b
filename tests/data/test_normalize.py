"""Normalisation: per-channel statistics, and denormalize inverting normalize."""

from __future__ import annotations

import pytest
import torch

from scm_graph.data.normalize import denormalize, normalize
from scm_graph.spec import DataSpec


@pytest.mark.parametrize("mode", ["pixel", "channel"])
def test_denormalize_inverts_normalize(mode: str):
    spec = DataSpec(normalize=mode, channels=3, mean=(120.5, 60.0, 200.0), std=(50.0, 10.0, 3.0))
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = normalize(x, spec, 0.5)
    assert y.dtype == torch.float32
    if mode == "pixel":
        assert torch.allclose(y, x.float() / 127.5 - 1)
    back = denormalize(y, spec, 0.5)
    assert torch.allclose(back, x.float(), atol=1e-3)
    assert torch.equal(back.round().to(torch.uint8), x)
