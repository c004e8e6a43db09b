"""The samplers against closed forms: point-mass data and Gaussian data, whose exact models are known.

For Gaussian data x0 ~ N(mu, s^2) (per element), with std_t^2 = cos^2 t s^2 + sin^2 t sigma_d^2:
- the PF-ODE flow is affine, phi_t(x0) = cos t mu + (std_t / s)(x0 - mu), so the exact consistency function
  f(x_t, t) = phi_t^{-1}(x_t) = mu + s (x_t - cos t mu) / std_t, and a consistency model's F solves
  f = cos t x_t - sin t sigma_d F (Eq. 5);
- the exact denoiser is D(x_t, t) = E[x0 | x_t] = mu + cos t s^2 (x_t - cos t mu) / std_t^2, and a diffusion
  model's F solves D = cos t x_t - sin t sigma_d F, so that dx_t/dt = sigma_d F is the PF-ODE (Eq. 3).
The two differ (they coincide only for a point mass, the old closed form), so each sampler meets the
model it is meant for.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scm_graph.errors import UserError
from scm_graph.sample.samplers import consistency_times, nfe, ode_times, sample_consistency, sample_ode

pytestmark = pytest.mark.usefixtures("torch_defaults")

SD = 0.5
T_MAX = math.atan(80 / SD)
SHAPE = (2, 4, 4)


class PointMassModel(nn.Module):
    """The exact TrigFlow model for data that is a point mass at `a`: f(x_t, t) = a for every x_t, i.e.
    F(x_t / sigma_d, t) = (cos t x_t - a) / (sin t sigma_d). Called like a TrigFlowModel, with x_t."""

    def __init__(self, a: torch.Tensor, sigma_d: float = SD):
        super().__init__()
        self.a, self.sigma_d, self.calls = a, sigma_d, 0

    def forward(self, x_t, t, labels=None, dropout_key=None):
        self.calls += 1
        assert t.shape == (x_t.shape[0],)
        tt = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return ((torch.cos(tt) * x_t - self.a) / (torch.sin(tt) * self.sigma_d)).to(x_t.dtype)


class GaussianModel(nn.Module):
    """The exact TrigFlow model for data x0 ~ N(mu, s^2) per element (see the module docstring): the consistency
    model (`kind="consistency"`, F from f) or the diffusion model (`kind="diffusion"`, F from D)."""

    def __init__(self, kind: str, mu: float = 1.0, s: float = 0.3, sigma_d: float = SD):
        super().__init__()
        self.kind, self.mu, self.s, self.sigma_d = kind, mu, s, sigma_d

    def std(self, t):
        return np.sqrt(np.cos(t) ** 2 * self.s**2 + np.sin(t) ** 2 * self.sigma_d**2)

    def f(self, x_t, t):
        """The exact consistency function (float64 numpy; t a float or an array broadcasting against x_t)."""
        return self.mu + self.s * (x_t - np.cos(t) * self.mu) / self.std(t)  # f = phi_t^{-1}(x_t)

    def denoiser(self, x_t, t):
        return self.mu + np.cos(t) * self.s**2 * (x_t - np.cos(t) * self.mu) / self.std(t) ** 2  # E[x0 | x_t]

    def flow(self, x0, t: float):
        """phi_t(x0): where the PF-ODE carries x0 at time t."""
        return math.cos(t) * self.mu + self.std(t) / self.s * (x0 - self.mu)

    def forward(self, x_t, t, labels=None, dropout_key=None):
        tt = t.to(torch.float64).reshape(-1, 1, 1, 1).numpy()
        x = x_t.to(torch.float64).numpy()
        target = self.f(x, tt) if self.kind == "consistency" else self.denoiser(x, tt)
        F = (np.cos(tt) * x - target) / (np.sin(tt) * self.sigma_d)  # target = cos t x_t - sin t sigma_d F
        return torch.from_numpy(F).to(x_t.dtype)


def point(seed: int = 0) -> PointMassModel:
    return PointMassModel(torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5)


def unit_noise(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- consistency sampling


@pytest.mark.parametrize("times", [[T_MAX], [T_MAX, 1.1], [T_MAX, 1.1, 0.6], [1.5, 0.3, 0.01]])
def test_consistency_sampling_follows_the_multistep_recursion_exactly(times):
    """x = sigma_d n_0, x0 = f(x, t_0); then x = cos t_i x0 + sin t_i sigma_d n_i, x0 = f(x, t_i) (Song et al. 2023,
    Alg. 1), with the Gaussian model's f written out in numpy: a sampler that drops x0, sigma_d or a noise fails."""
    m = GaussianModel("consistency")
    noise = [unit_noise(6, seed=i) for i in range(len(times))]
    n = [x.numpy() for x in noise]
    x0 = m.f(SD * n[0], times[0])
    for t_i, n_i in zip(times[1:], n[1:]):
        x0 = m.f(math.cos(t_i) * x0 + math.sin(t_i) * SD * n_i, t_i)
    out = sample_consistency(m, noise, times)
    assert out.dtype == torch.float64 and out.shape == (6, *SHAPE)
    np.testing.assert_allclose(out.numpy(), x0, rtol=1e-12, atol=1e-12)


def test_two_step_consistency_samples_have_the_data_distribution():
    """With the exact f, two-step samples are distributed as the data, N(mu, s^2); a sampler that does not
    re-noise the first step's x0 (x = sigma_d n at t_mid) gives mean 0.71 and std 0.32 instead of 1 and 0.3."""
    m = GaussianModel("consistency", mu=1.0, s=0.3)
    noise = [unit_noise(2500, seed=i) for i in range(2)]  # 80,000 numbers
    out = sample_consistency(m, noise, [T_MAX, 1.1])
    assert abs(out.mean().item() - 1.0) < 0.01 and abs(out.std().item() - 0.3) < 0.01


def test_consistency_sampling_returns_the_point_of_a_point_mass():
    m = point()
    x = sample_consistency(m, [unit_noise(8, seed=i) for i in range(3)], [T_MAX, 1.1, 0.6])
    torch.testing.assert_close(x, m.a.expand_as(x), rtol=0, atol=1e-5)
    assert m.calls == 3


# ----------------------------------------------------------------------------- PF-ODE


def test_heun_step_matches_the_hand_written_step():
    """On the grid [t0, t1, 0]: one Heun step (Euler predictor, trapezoidal corrector at t1), then an Euler
    step to 0 (EDM's last step), with the velocity dx/dt = sigma_d F (Eq. 3) of the Gaussian model."""
    m = GaussianModel("diffusion")
    t0, t1 = 1.3, 0.4
    n = unit_noise(5)

    def v(x, t):  # sigma_d F(x_t / sigma_d, t) = (cos t x - D(x, t)) / sin t
        return (math.cos(t) * x - m.denoiser(x, t)) / math.sin(t)

    x = SD * n.numpy()
    h = t1 - t0
    d0 = v(x, t0)
    x1 = x + h * 0.5 * (d0 + v(x + h * d0, t1))
    want = x1 + (0.0 - t1) * v(x1, t1)
    np.testing.assert_allclose(sample_ode(m, n, [t0, t1, 0.0], "heun").numpy(), want, rtol=1e-12, atol=1e-12)
    e1 = x + h * d0
    np.testing.assert_allclose(sample_ode(m, n, [t0, t1, 0.0], "euler").numpy(), e1 - t1 * v(e1, t1), rtol=1e-12)


def _trajectory_error(m: GaussianModel, steps: int, solver: str) -> float:
    """Max error at t_min = arctan(0.002 / sigma_d), before the final step to 0, against the exact flow
    phi_{t_min}(f(x_T, t_max)) through x_T = sigma_d n (f of the same data is the flow's inverse)."""
    noise = unit_noise(8)
    times = ode_times(steps, SD)[:-1]
    exact = m.flow(m.f(SD * noise.numpy(), times[0]), times[-1])
    return float(np.abs(sample_ode(m, noise, times, solver).numpy() - exact).max())


def test_ode_error_shrinks_with_steps_and_heun_beats_euler():
    m = GaussianModel("diffusion")
    heun = {n: _trajectory_error(m, n, "heun") for n in (8, 16, 32, 64)}
    euler = {n: _trajectory_error(m, n, "euler") for n in (16, 32, 64)}
    assert heun[32] < heun[16] / 3.5 and heun[64] < heun[32] / 3.5 and heun[16] < heun[8] / 3  # second order: /4
    assert euler[64] < euler[32] < euler[16] and euler[64] > euler[32] / 2.5  # first order: /2
    for n in (32, 64):
        assert euler[n] > 5 * heun[n]


def test_ode_endpoint_of_a_point_mass():
    m = point()
    x = sample_ode(m, unit_noise(8), ode_times(32, SD), "heun")
    torch.testing.assert_close(x, m.a.expand_as(x), rtol=0, atol=1e-4)


class LabelPointMassModel(nn.Module):
    """Class c is a point mass at a[c], the null class (-1) a point mass at a_u: the exact conditional and
    unconditional F of a labelled point-mass data set. Counts its calls."""

    def __init__(self, a: torch.Tensor, a_u: torch.Tensor, sigma_d: float = SD):
        super().__init__()
        self.a, self.a_u, self.sigma_d, self.calls = a, a_u, sigma_d, 0

    def forward(self, x_t, t, labels=None, dropout_key=None):
        self.calls += 1
        target = torch.where((labels >= 0).reshape(-1, 1, 1, 1), self.a[labels.clamp(min=0)], self.a_u)
        tt = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return ((torch.cos(tt) * x_t - target) / (torch.sin(tt) * self.sigma_d)).to(x_t.dtype)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_guided_ode_lands_on_the_guided_point(s: float):
    """CFG on point masses: F_u + s (F_c - F_u) is the F of a point mass at a_u + s (a_c - a_u), so the guided
    PF-ODE ends there; one batched call per evaluation (none extra at s = 1)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
    a_u = a.mean(0)
    m = LabelPointMassModel(a, a_u)
    labels = torch.tensor([0, 1, 2, 1])
    times = ode_times(32, SD)
    x = sample_ode(m, unit_noise(4).double(), times, "heun", labels, guidance=s)
    torch.testing.assert_close(x, a_u + s * (a[labels] - a_u), rtol=0, atol=1e-4)
    assert m.calls == 2 * 32 - 1  # Heun, N = 32: 63 evaluations, each one call for both passes


# ----------------------------------------------------------------------------- time grids, nfe


@pytest.mark.parametrize("steps", [1, 2, 5, 18, 32])
@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_ode_times(steps: int, sigma_d: float):
    ts = ode_times(steps, sigma_d)
    assert len(ts) == steps + 1 and all(isinstance(t, float) for t in ts)
    assert ts[0] == pytest.approx(math.atan(80 / sigma_d), abs=1e-12) and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps > 1:
        assert ts[-2] == pytest.approx(math.atan(0.002 / sigma_d), rel=1e-9)
        sig = [sigma_d * math.tan(t) for t in ts[:-1]]  # EDM rho = 7 spacing
        r = [s ** (1 / 7) for s in sig]
        assert np.allclose(np.diff(r), (r[-1] - r[0]) / (steps - 1), rtol=1e-6, atol=1e-9)


def test_consistency_times():
    assert consistency_times(1, SD) == [T_MAX]
    assert consistency_times(2, SD) == [T_MAX, 1.1]
    ts = consistency_times(4, SD)
    assert len(ts) == 4 and ts[:2] == [T_MAX, 1.1] and all(a > b > 0 for a, b in zip(ts, ts[1:]))
    assert consistency_times(1, 1.0) == [math.atan(80.0)]
    for bad in (0, -1):
        with pytest.raises(UserError, match="--steps must be at least 1"):
            consistency_times(bad, SD)
        with pytest.raises(UserError, match="--steps must be at least 1"):
            ode_times(bad, SD)


@pytest.mark.parametrize("t_mid", [0.3, 0.821, 1.1, 1.3, T_MAX - 1e-9])
def test_consistency_times_take_t_mid(t_mid):
    """2 steps are exactly [t_max, t_mid]; more start at t_mid below t_max; 1 step ignores it."""
    assert consistency_times(2, SD, t_mid) == [T_MAX, t_mid]
    ts = consistency_times(4, SD, t_mid)
    assert ts[:2] == [T_MAX, t_mid] and len(ts) == 4 and all(a > b > 0 for a, b in zip(ts, ts[1:]))
    assert np.allclose(np.diff(ts[1:]), -t_mid / 4)  # steps - 1 times from t_mid, spaced t_mid / steps
    assert consistency_times(1, SD, t_mid) == [T_MAX]
    assert consistency_times(2, 1.0, min(t_mid, 1.5)) == [math.atan(80.0), min(t_mid, 1.5)]


@pytest.mark.parametrize("t_mid", [0.0, -0.5, T_MAX, 2.0, math.nan, math.inf])
def test_consistency_times_reject_a_t_mid_outside_0_t_max(t_mid):
    for steps in (2, 3):
        with pytest.raises(UserError) as e:
            consistency_times(steps, SD, t_mid)
        assert str(e.value) == f"t_mid must lie in (0, t_max) = (0, {T_MAX:.4f}) for sigma_d 0.5, not {t_mid}"
    assert consistency_times(1, SD, t_mid) == [T_MAX]  # one step has no t_mid


def test_nfe():
    for n in (1, 2, 7):
        assert nfe(True, n, "heun") == nfe(True, n, "euler") == n
        assert nfe(False, n, "euler") == n
        assert nfe(False, n, "heun") == 2 * n - 1
