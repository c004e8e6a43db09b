"""EMA with a half-life counted in images, against the closed form."""

import torch
from torch import nn

from scm_graph.train.ema import EMA, ema_beta


def test_beta_halves_weight_after_one_half_life():
    for batch, halflife in [(128, 20_000), (512, 500_000), (7, 1000)]:
        beta = ema_beta(batch, 10**9, halflife)
        assert abs(beta ** (halflife / batch) - 0.5) < 1e-12  # 0.5^(batch/halflife) per step


def test_rampup_caps_half_life_and_zero_means_copy():
    assert ema_beta(100, 1000, 1e9, rampup=0.05) == 0.5 ** (100 / 50)  # half-life min(1e9, 0.05 * 1000)
    assert ema_beta(100, 1000, 0.0) == 0.0


def test_update_matches_closed_form():
    torch.manual_seed(0)
    m = nn.Linear(3, 2).double()
    ema = EMA(m)
    start = {k: v.clone() for k, v in ema.params.items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    beta, k = 0.9, 5
    for _ in range(k):
        ema.update(m, beta)
    for name, p in m.named_parameters():
        # constant theta: ema_k = theta + beta^k (ema_0 - theta)
        assert torch.allclose(ema.params[name], p + beta**k * (start[name] - p), atol=1e-14)
