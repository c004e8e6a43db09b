"""Network building blocks against hand-written float64 references and statistical properties."""

import math

import torch
from torch.func import jvp

from scm_graph.nets.layers import AdaptiveDoubleNorm, KeyedDropout, PositionalEmbedding, keyed_uniform, pnorm

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
