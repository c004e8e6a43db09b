"""Keyed dropout: uniform statistics, determinism in (key, salt), keep rate and unbiased scale."""

from __future__ import annotations

import torch

from scm_graph.nets.dropout import KeyedDropout, keyed_uniform


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
