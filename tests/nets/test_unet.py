"""The U-Net: attention placement, config errors, zero init, conditioning, its JVP (fused attention, eager
against finite differences, compiled against eager)."""

from __future__ import annotations

import pytest
import torch

from scm_graph.nets.attention import SelfAttention2d
from scm_graph.nets.unet import UNet
from tests.helpers import compiled_jvp_vs_eager, jvp_vs_central_difference, perturb_zero_init

F64 = torch.float64


TINY_UNET = dict(channels=8, channel_mult=(1, 2), num_blocks=1, norm_groups=4, head_dim=4)


@pytest.mark.parametrize("attn_resolutions,want", [
    ((), []),
    ((8,), [8, 8, 8, 4]),  # encoder 1 + decoder 2 at 8x8, then the middle block at 4x4
    ((4,), [4, 4, 4, 4]),  # encoder 1 + middle 1 + decoder 2 at 4x4
    ((8, 4), [8, 8, 8, 4, 4, 4, 4]),
])
def test_unet_attention_placement(attn_resolutions, want):
    torch.manual_seed(0)
    net = UNet(8, 1, attn_resolutions=attn_resolutions, **TINY_UNET)
    seen = []
    for mod in net.modules():
        if isinstance(mod, SelfAttention2d):
            mod.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert sorted(seen, reverse=True) == want
    assert all(b.attn is None for b in [*net.enc, *net.dec] if b.resample != "none")  # never on resampling blocks
    assert (net.mid[0].attn is not None) == bool(attn_resolutions) and net.mid[1].attn is None


def test_unet_unreachable_attention_resolution_is_one_line_error():
    for bad in [(16,), (2,), (8, 6)]:
        with pytest.raises(ValueError, match="attn_resolutions") as e:
            UNet(8, 1, attn_resolutions=bad, **TINY_UNET)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="head_dim"):  # 16 channels at 4x4 make 16 // 5 = 3 heads: uneven
        UNet(8, 1, **{**TINY_UNET, "head_dim": 5}, attn_resolutions=(4,))


def test_attention_unet_zero_init_shape_and_attention_path():
    torch.manual_seed(0)
    net = UNet(8, 1, attn_resolutions=(8, 4), **TINY_UNET).double()
    x, c = torch.randn(3, 1, 8, 8, dtype=F64), torch.rand(3, dtype=F64)
    out = net(x, c)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer
    perturb_zero_init(net, only="conv_out")
    a = net(x, c)
    assert a.abs().max() > 1e-3
    perturb_zero_init(net, only="attn.proj")  # the attention outputs now contribute
    b = net(x, c)
    assert (a - b).abs().max() > 1e-4


def test_attention_unet_class_conditioning_changes_output():
    torch.manual_seed(0)
    net = UNet(8, 1, attn_resolutions=(4,), num_classes=10, **TINY_UNET).double()
    perturb_zero_init(net)
    x, c = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64)
    a = net(x, c, torch.tensor([1, 2]))
    assert (a - net(x, c, torch.tensor([3, 2]))).abs()[0].max() > 1e-4
    assert torch.equal(a[1], net(x, c, torch.tensor([3, 2]))[1])
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)


def test_attention_unet_jvp_is_fused_and_matches_central_difference():
    torch.manual_seed(0)
    net = UNet(8, 1, attn_resolutions=(8, 4), num_classes=10, **TINY_UNET).double()
    perturb_zero_init(net)
    x, c, labels = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64), torch.tensor([0, 7])
    rel, fused = jvp_vs_central_difference(lambda x, c: net(x, c, labels), x, c)
    assert rel < 1e-6
    assert fused == 7  # every attention block's tangent came from the fused op


@pytest.mark.slow
def test_attention_unet_compiled_jvp_matches_eager(torch_defaults):
    torch.manual_seed(0)
    net = UNet(8, 1, attn_resolutions=(8,), **{**TINY_UNET, "channel_mult": (1,)})  # one level: faster to compile
    perturb_zero_init(net)
    compiled_jvp_vs_eager(net, torch.randn(2, 1, 8, 8), torch.rand(2), num_attn=4)


