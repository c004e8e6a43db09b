"""Network building blocks against hand-written float64 references and statistical properties."""

import math

import pytest
import torch
from torch.func import functional_call, jvp

from scm_graph import ops
from scm_graph.model import build_model
from scm_graph.nets.attention import SelfAttention2d
from scm_graph.nets.layers import AdaptiveDoubleNorm, KeyedDropout, PositionalEmbedding, keyed_uniform, pnorm
from scm_graph.nets.unet import UNet
from tests.conftest import tiny_spec

F64 = torch.float64


def test_positional_embedding_matches_formula_and_has_unit_max_frequency():
    emb = PositionalEmbedding(16).double()
    c = torch.tensor([0.0, 0.3, 1.2, math.pi / 2], dtype=F64)
    out = emb(c)
    ref = torch.empty(4, 16, dtype=F64)
    for k in range(8):
        w = 10000.0 ** (-k / 8)  # w_k = (1/10000)^(k/half)
        ref[:, k] = torch.cos(w * c)
        ref[:, 8 + k] = torch.sin(w * c)
    assert torch.allclose(out, ref, atol=1e-15)
    # largest frequency is 1: |d emb / dc| <= 1 (the small Fourier scale of sCM Sec. 4.1)
    _, d = jvp(emb, (c,), (torch.ones_like(c),))
    assert d.abs().max() <= 1.0 + 1e-12


def test_pnorm_unit_rms_over_channels():
    v = torch.randn(5, 7, dtype=F64) * 3
    out = pnorm(v, eps=0.0)
    assert torch.allclose(out.square().mean(1), torch.ones(5, dtype=F64))
    assert torch.allclose(out * v.norm(dim=1, keepdim=True) / math.sqrt(7), v)


def test_adaptive_double_norm_matches_hand_written_reference():
    torch.manual_seed(0)
    layer = AdaptiveDoubleNorm(8, 6, groups=2).double()
    x = torch.randn(3, 8, 4, 4, dtype=F64) * 2 + 1
    emb = torch.randn(3, 6, dtype=F64)
    out = layer(x, emb)
    g = x.reshape(3, 2, 4 * 16)  # group norm by hand: biased variance, eps 1e-5
    xn = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(x)

    def rms_norm(v):
        return v / torch.sqrt(v.square().mean(1, keepdim=True) + 1e-4)

    s = rms_norm(emb @ layer.scale.weight.T + layer.scale.bias)[:, :, None, None]
    b = rms_norm(emb @ layer.shift.weight.T + layer.shift.bias)[:, :, None, None]
    assert torch.allclose(out, xn * s + b, atol=1e-12)


def test_keyed_uniform_statistics_and_determinism():
    shape = torch.Size([64, 32, 16])
    u = keyed_uniform(shape, torch.tensor(7), 3, torch.device("cpu"))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    # neighbouring elements uncorrelated
    a, b = u.flatten()[:-1] - 0.5, u.flatten()[1:] - 0.5
    assert abs((a * b).mean().item()) < 2e-3
    assert torch.equal(u, keyed_uniform(shape, torch.tensor(7), 3, torch.device("cpu")))
    for other in (keyed_uniform(shape, torch.tensor(8), 3, torch.device("cpu")),
                  keyed_uniform(shape, torch.tensor(7), 4, torch.device("cpu"))):
        assert (u == other).float().mean() < 1e-3


def test_keyed_dropout_keep_rate_and_unbiased_scale():
    d = KeyedDropout(0.2, salt=1).train()
    x = torch.ones(200, 1000)
    y = d(x, torch.tensor(5))
    assert abs((y > 0).float().mean().item() - 0.8) < 3e-3
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.8))
    assert abs(y.mean().item() - 1.0) < 5e-3  # E[dropout(x)] = x
    assert torch.equal(d.eval()(x, torch.tensor(5)), x)


# ---------------------------------------------------------------------------------------------
# Self-attention in the U-Net (and helpers shared with test_dit.py)


TINY_UNET = dict(channels=8, channel_mult=(1, 2), num_blocks=1, norm_groups=4, head_dim=4)


def perturb_zero_init(net: torch.nn.Module, std: float = 0.1, seed: int = 0, only: str = "") -> None:
    """Fill every all-zero parameter (the zero-initialised output layers) whose name contains `only` with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if only in name and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def jvp_vs_central_difference(f, x: torch.Tensor, c: torch.Tensor, h: float = 1e-6) -> tuple[float, int]:
    """(relative error of torch.func.jvp's tangent against a central difference along (dx, dc), fused-op calls)."""
    g = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=g, dtype=x.dtype)
    dc = torch.randn(c.shape, generator=g, dtype=c.dtype)
    before = ops.calls["jvp:math"]
    with ops.use_backend("math"):
        _, tangent = torch.func.jvp(f, (x, c), (dx, dc))
    fused = ops.calls["jvp:math"] - before
    fd = (f(x + h * dx, c + h * dc) - f(x - h * dx, c - h * dc)) / (2 * h)  # dF ~ (F(p + h v) - F(p - h v)) / 2h
    return ((tangent - fd).norm() / fd.norm()).item(), fused


def compiled_jvp_vs_eager(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor, num_attn: int) -> None:
    """torch.compile(fullgraph) of jvp over functional_call gives eager's primal and tangent, and the fused
    op runs when the compiled graph runs (counted on a second call, after tracing is done)."""
    g = torch.Generator().manual_seed(2)
    dx, dc = torch.randn(x.shape, generator=g), torch.randn(c.shape, generator=g)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def step(params, x, c, dx, dc):
        return torch.func.jvp(lambda x, c: functional_call(net, params, (x, c)), (x, c), (dx, dc))

    with ops.use_backend("math"):
        out_e, dout_e = step(params, x, c, dx, dc)
        compiled = torch.compile(step, fullgraph=True)
        compiled(params, x, c, dx, dc)  # traces and compiles
        before = ops.calls["jvp:math"]
        out_c, dout_c = compiled(params, x, c, dx, dc)
        assert ops.calls["jvp:math"] - before == num_attn
    assert dout_e.abs().max() > 1e-3
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dout_c, dout_e, atol=1e-5, rtol=1e-5)


def test_self_attention_block_matches_hand_written_reference():
    torch.manual_seed(0)
    blk = SelfAttention2d(8, head_dim=4, groups=2).double()
    perturb_zero_init(blk)
    x = torch.randn(2, 8, 3, 5, dtype=F64)
    out = blk(x)
    assert blk.heads == 2
    g = x.reshape(2, 2, -1)  # affine-free group norm, 2 groups, eps 1e-5
    xn = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(x)
    qkv = torch.einsum("oc,bcn->bon", blk.qkv.weight[:, :, 0, 0], xn.reshape(2, 8, 15)) + blk.qkv.bias[:, None]
    heads = []
    for m in range(2):  # q, k, v = channels [0, 8), [8, 16), [16, 24); head m takes 4 of each
        q, k, v = (qkv[:, j * 8 + m * 4: j * 8 + m * 4 + 4] for j in range(3))  # [B, d, N]
        p = torch.softmax(torch.einsum("bdi,bdj->bij", q, k) / 2.0, dim=-1)  # softmax(q_i . k_j / sqrt(4))
        heads.append(torch.einsum("bij,bdj->bdi", p, v))
    o = torch.cat(heads, 1)
    proj = torch.einsum("oc,bcn->bon", blk.proj.weight[:, :, 0, 0], o) + blk.proj.bias[:, None]
    ref = (x + proj.reshape_as(x)) / math.sqrt(2)
    assert torch.allclose(out, ref, atol=1e-12)


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


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_time_embedding_and_modulation_stay_float32_under_autocast(arch):
    """DESIGN.md sec. 2: under bf16 autocast t, the time embedding and the adaptive-norm modulation
    are float32 while the body (convs / attention projections) runs in bf16."""
    net = dict(arch=arch, head_dim=4, depth=1, attn_resolutions=(4,)) if arch == "dit" else dict(attn_resolutions=(4,), head_dim=4)
    if arch == "dit":
        net.pop("attn_resolutions")
        net.update(channels=8)
    m = build_model(tiny_spec(**net))
    seen: dict[str, torch.dtype] = {}
    norm = next(mod for mod in m.modules() if hasattr(mod, "scale") and isinstance(mod.scale, torch.nn.Linear))
    body = next(mod for name, mod in m.net.named_modules() if name.endswith("qkv"))
    for name, mod in (("emb", m.net.map1), ("modulation", norm.scale), ("body", body)):
        mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 1, 8, 8), torch.rand(2) + 0.1, torch.tensor([1, 2]))
    assert seen == {"emb": torch.float32, "modulation": torch.float32, "body": torch.bfloat16}
