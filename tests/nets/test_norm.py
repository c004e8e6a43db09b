"""Pixel norm and the adaptive double normalisation (group-norm and token variants) against float64 references."""

from __future__ import annotations

import math

import torch

from scm_graph.nets.norm import GroupAdaptiveNorm, TokenAdaptiveNorm, pnorm

F64 = torch.float64


def test_pnorm_unit_rms_over_channels():
    v = torch.randn(5, 7, dtype=F64) * 3
    out = pnorm(v, eps=0.0)
    assert torch.allclose(out.square().mean(1), torch.ones(5, dtype=F64))
    assert torch.allclose(out * v.norm(dim=1, keepdim=True) / math.sqrt(7), v)


def test_adaptive_double_norm_matches_hand_written_reference():
    torch.manual_seed(0)
    layer = GroupAdaptiveNorm(8, 6, groups=2).double()
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


def test_token_pnorm_and_adaptive_norm_match_float64_reference():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 7, dtype=F64) * 3
    ref = v / torch.sqrt((v**2).sum(-1, keepdim=True) / 7 + 1e-4)  # pnorm over channels (last dim)
    assert torch.allclose(pnorm(v, dim=-1), ref, atol=1e-14)
    layer = TokenAdaptiveNorm(6, 4).double()
    x = torch.randn(3, 5, 6, dtype=F64) * 2 + 1
    emb = torch.randn(3, 4, dtype=F64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    xn = (x - mu) / torch.sqrt(var + 1e-6)  # layer norm without affine
    s = emb @ layer.scale.weight.T + layer.scale.bias
    b = emb @ layer.shift.weight.T + layer.shift.bias
    s = s / torch.sqrt(s.square().mean(-1, keepdim=True) + 1e-4)
    b = b / torch.sqrt(b.square().mean(-1, keepdim=True) + 1e-4)
    assert torch.allclose(layer(x, emb), xn * s[:, None] + b[:, None], atol=1e-12)


def test_pnorm_of_half_precision_does_not_overflow():
    """fp16 and bf16 take the mean square in float32: 256 (EDM2's activation clip) squared passes fp16's maximum."""
    v = torch.tensor([[256.0, 1.0, 1.0, 1.0], [3.0, -2.0, 0.5, 0.0]], dtype=F64)
    ref = v / (v.square().mean(1, keepdim=True) + 1e-4).sqrt()  # float64 reference
    for dtype in (torch.float16, torch.bfloat16):
        out = pnorm(v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.to(F64), ref, rtol=1e-2, atol=1e-2)
