"""TrigFlow identities in float64 against closed forms and finite differences."""

import math

import torch

from scm_graph import trigflow

SD = 0.5


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * SD
    z = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * SD
    t = torch.rand(n, generator=g, dtype=torch.float64) * (math.pi / 2)
    return x0, z, t


def test_consistency_fn_is_identity_at_t0():
    x0, z, _ = _data()
    F = torch.randn_like(x0)
    assert torch.equal(trigflow.consistency_fn(x0, torch.zeros(6, dtype=torch.float64), F, SD), x0)


def test_endpoints_and_velocity_is_time_derivative():
    x0, z, t = _data()
    assert torch.allclose(trigflow.noisy(x0, z, torch.zeros(6, dtype=torch.float64)), x0)
    assert torch.allclose(trigflow.noisy(x0, z, torch.full((6,), math.pi / 2, dtype=torch.float64)), z, atol=1e-15)
    h = 1e-6
    fd = (trigflow.noisy(x0, z, t + h) - trigflow.noisy(x0, z, t - h)) / (2 * h)
    assert torch.allclose(trigflow.velocity(x0, z, t), fd, rtol=1e-8, atol=1e-9)


def test_marginal_variance_preserved_for_sigma_d_data():
    # x0, z ~ N(0, sigma_d^2) independent => x_t ~ N(0, sigma_d^2) for every t (cos^2 + sin^2 = 1)
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = torch.randn(n, generator=g, dtype=torch.float64) * SD
    z = torch.randn(n, generator=g, dtype=torch.float64) * SD
    for tv in (0.1, 0.7, 1.3):
        x_t = trigflow.noisy(x0, z, torch.full((n,), tv, dtype=torch.float64))
        assert abs(x_t.std().item() - SD) < 3e-3
        assert abs(x_t.mean().item()) < 3e-3
    # a degenerate x0 = c: mean cos(t) c and std sin(t) sigma_d exactly in expectation
    x_t = trigflow.noisy(torch.full((n,), 2.0, dtype=torch.float64), z, torch.full((n,), 0.4, dtype=torch.float64))
    assert abs(x_t.mean().item() - 2 * math.cos(0.4)) < 3e-3
    assert abs(x_t.std().item() - SD * math.sin(0.4)) < 3e-3


def test_time_proposal_cdf():
    # P(t <= t0) = Phi((log(sigma_d tan t0) - P_mean) / P_std)
    g = torch.Generator().manual_seed(2)
    P_mean, P_std, n = -1.0, 1.4, 200_000
    t = trigflow.sample_t(torch.randn(n, generator=g, dtype=torch.float64) * P_std + P_mean, SD)
    assert t.min() > 0 and t.max() < math.pi / 2
    for t0 in (0.2, 0.6, 1.0, 1.4):
        cdf = 0.5 * (1 + math.erf((math.log(SD * math.tan(t0)) - P_mean) / (P_std * math.sqrt(2))))
        assert abs((t <= t0).double().mean().item() - cdf) < 5e-3


def test_edm_trigflow_round_trip():
    x0, z, t = _data()
    sigma = trigflow.edm_sigma(t, SD)
    assert torch.allclose(trigflow.trig_t(sigma, SD), t)
    # EDM's x_edm = x0 + sigma n (n unit noise) is cos(t)-scaled TrigFlow x_t with z = sigma_d n
    n_unit = z / SD
    x_edm = x0 + trigflow.expand(sigma, x0) * n_unit
    assert torch.allclose(trigflow.edm_to_trig_x(x_edm, t), trigflow.noisy(x0, z, t))
    assert torch.allclose(trigflow.trig_to_edm_x(trigflow.edm_to_trig_x(x_edm, t), t), x_edm)
    F = torch.randn_like(x0)
    x_t = trigflow.noisy(x0, z, t)
    D = trigflow.edm_denoiser_from_F(x_t, t, F, SD)
    assert torch.allclose(trigflow.F_from_edm_denoiser(x_t, t, D, SD), F)
    # the ideal denoiser of a point mass x0 gives F = -v_t target direction: sigma_d F = v_t exactly
    F_star = trigflow.F_from_edm_denoiser(x_t, t, x0, SD)
    assert torch.allclose(SD * F_star, trigflow.velocity(x0, z, t))


def test_t_max():
    assert math.isclose(SD * math.tan(trigflow.t_max(SD)), 80.0)
