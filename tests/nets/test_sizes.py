"""The size presets (scm_graph.nets.sizes): every EDM2 and DiT size built on the meta device (no memory) has the
parameter count we record, and each EDM2 size is within 10% of the paper's (the sCM changes add a few percent)."""

from __future__ import annotations

import pytest
import torch

from scm_graph.model import num_params
from scm_graph.nets.dit import DiT
from scm_graph.nets.edm2 import EDM2UNet
from scm_graph.nets.sizes import DIT_SIZES, EDM2_SIZES, DiTSize, EDM2Size


def _edm2(size: EDM2Size, channels: int) -> int:
    with torch.device("meta"):
        net = EDM2UNet(64, channels, channels=size.channels, channel_mult=size.channel_mult, num_blocks=size.num_blocks,
                       attn_resolutions=size.attn_resolutions, num_classes=1000)
    return num_params(net)


@pytest.mark.parametrize("name", list(EDM2_SIZES))
def test_edm2_size_matches_the_paper_within_10_percent(name):
    size = EDM2_SIZES[name]
    latents, pixels = _edm2(size, 4), _edm2(size, 3)  # ImageNet 512 (SD-VAE latents 4x64x64) and ImageNet 64
    assert (latents, pixels) == (size.params, size.params_pixels)
    for n in (latents, pixels):
        assert abs(n / size.paper_params - 1) < 0.10, (name, n, size.paper_params)
    print(f"EDM2-{name}: ours {latents / 1e6:.1f}M (4x64x64), {pixels / 1e6:.1f}M (3x64x64), paper {size.paper_params / 1e6:.0f}M")


@pytest.mark.parametrize("name", list(DIT_SIZES))
def test_dit_size_has_our_expected_count(name):
    size: DiTSize = DIT_SIZES[name]
    with torch.device("meta"):
        net = DiT(32, 4, width=size.width, depth=size.depth, patch_size=size.patch_size, head_dim=size.head_dim,
                  num_classes=1000)
    n = num_params(net)
    assert n == size.params
    assert 0.8 < n / size.paper_params < 1.0  # adaptive double norm (4 width^2 per block) instead of adaLN-Zero (6 width^2)
    print(f"DiT-{name}/2: ours {n / 1e6:.1f}M, DiT's {size.paper_params / 1e6:.0f}M, ratio {n / size.paper_params:.3f}")


def test_presets_give_the_spec_sections():
    s = EDM2_SIZES["XL"].spec()
    assert (s.channels, s.channel_mult, s.num_blocks, s.attn_resolutions) == (384, (1, 2, 3, 4), 3, (16, 8))
    d = DIT_SIZES["XL"].spec()
    assert (d.width, d.depth, d.patch_size, d.head_dim) == (1152, 28, 2, 72)
