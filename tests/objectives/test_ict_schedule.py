"""iCT's discrete-time pieces against closed forms (scm_graph.objectives.ict_schedule): the Karras grid, the
curriculum at the paper's stage boundaries, the index distribution against the erf formula computed with
math.erf, the Pseudo-Huber distance at 0, near 0 and far away, and the EDM boundary condition f(x, sigma_min) = x."""

from __future__ import annotations

import math

import pytest
import torch

from scm_graph.objectives import ict_schedule as ict


def test_karras_grid_endpoints_monotone_and_linear_at_rho_1():
    s = ict.karras_sigmas(11)
    assert s.dtype == torch.float64 and s.shape == (11,)
    assert float(s[0]) == pytest.approx(0.002, rel=1e-12) and float(s[-1]) == pytest.approx(80.0, rel=1e-12)
    assert bool((s[1:] > s[:-1]).all())
    assert torch.allclose(ict.karras_sigmas(5, 1.0, 3.0, rho=1.0), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0], dtype=torch.float64))
    # one interior point by hand: i = 3 of N = 7
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    assert float(ict.karras_sigmas(7)[3]) == pytest.approx((lo + 3 / 6 * (hi - lo)) ** 7, rel=1e-12)
    with pytest.raises(ValueError):
        ict.karras_sigmas(1)


def test_curriculum_doubles_from_s0_to_s1_at_the_stage_boundaries():
    K = 400_000  # iCT's CIFAR-10 length: log2(1280 / 10) + 1 = 8 stages of K' = 50_000 steps
    stage = K // 8
    assert [ict.curriculum_steps(k, K) for k in (0, stage - 1)] == [11, 11]
    assert [ict.curriculum_steps(j * stage, K) for j in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict.curriculum_steps(K - 1, K) == ict.curriculum_steps(10 * K, K) == 1281  # capped at s1 + 1
    # a run shorter than the 8 stages (K' would be 0): one step per stage
    assert [ict.curriculum_steps(k, 3) for k in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]


def test_index_distribution_sums_to_one_and_matches_the_erf_formula():
    s = ict.karras_sigmas(41)
    p = ict.index_probs(s)
    assert p.shape == (40,) and float(p.sum()) == pytest.approx(1.0, abs=1e-12) and bool((p > 0).all())

    def phi(x: float) -> float:
        return math.erf((math.log(x) - ict.P_MEAN) / (math.sqrt(2) * ict.P_STD))

    raw = [phi(float(s[i + 1])) - phi(float(s[i])) for i in range(40)]
    assert p.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-10)
    # the mode sits where the log-normal puts its mass: near exp(P_mean) ~ 0.33, not at the ends
    peak = float(s[int(p.argmax())])
    assert 0.05 < peak < 2.0


def test_pair_weight_is_the_reciprocal_gap():
    s = ict.karras_sigmas(6)
    i = torch.tensor([0, 2, 4])
    assert torch.allclose(ict.pair_weight(s, i), 1 / (s[i + 1] - s[i]))


def test_pseudo_huber_at_zero_near_zero_and_far_away():
    c = ict.huber_c(3 * 32 * 32)
    assert c == pytest.approx(0.00054 * math.sqrt(3072))
    a = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(ict.pseudo_huber(a, a, c), torch.zeros(4, dtype=torch.float64))
    e = torch.zeros_like(a)
    e[:, 0, 0, 0] = 1e-6  # |a - b| << c: d ~ |a - b|^2 / (2c)
    assert ict.pseudo_huber(a + e, a, c).tolist() == pytest.approx([1e-12 / (2 * c)] * 4, rel=1e-6)
    far = torch.full_like(a, 1.0)  # |a - b| = sqrt(3072) >> c: d = sqrt(3072 + c^2) - c ~ |a - b| - c
    d = ict.pseudo_huber(a + far, a, c)
    assert d.tolist() == pytest.approx([math.sqrt(3072 + c * c) - c] * 4, rel=1e-12)
    assert d.tolist() == pytest.approx([math.sqrt(3072) - c] * 4, abs=c * c / math.sqrt(3072))


def test_cm_coefficients_keep_the_boundary_and_match_edm_far_from_it():
    sigma_d = 0.5
    c_skip, c_out, c_in = ict.cm_coefficients(torch.tensor([ict.SIGMA_MIN], dtype=torch.float64), sigma_d)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0  # f(x, sigma_min) = x
    sigma = torch.tensor([1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = ict.cm_coefficients(sigma, sigma_d, sigma_min=0.0)  # sigma_min = 0: EDM's preconditioning
    assert torch.allclose(c_skip, sigma_d**2 / (sigma**2 + sigma_d**2))
    assert torch.allclose(c_out, sigma * sigma_d / torch.sqrt(sigma**2 + sigma_d**2))
    assert torch.allclose(c_in, 1 / torch.sqrt(sigma**2 + sigma_d**2))
