"""sCD end to end against a closed form: a class-conditional mixture of Gaussians (tests/objectives/mog.py) is the
teacher, its TrigFlow velocity exact and analytic, conditional and unconditional. A small MLP student trained
from scratch with `scd_loss` for a bounded number of steps must sample the target:

- s = 1: the 1- and 2-step samples of each class have the class's mean and covariance and land in its component;
- s = 2: the 1- and 2-step samples end where the exact guided PF-ODE dx/dt = v_u + 2 (v_c - v_u), integrated
  with RK4 from the same noise (and, for two steps, re-noised at t_mid with the same second noise), ends.

A wrong sign in the teacher's velocity, a missing sigma_d (dx_t/dt = F instead of sigma_d F) or the tangent's
cos t sin t pre-scaling applied twice must fail the same criteria. To keep the file near a minute, the faults are
injected into 300 more steps from the trained student, beside a fault-free control of the same 300 steps that
must still pass: the target is the correct objective's fixed point and not the faulty ones'. (Trained from
scratch with a fault for 800 steps, they fail too: sigma_d with s = 2 endpoint errors 0.13 / 0.11, the tangent
applied twice with 0.85 / 0.32, the sign fault diverges.)

Nothing is warm-started: the student starts from a random init (the teacher is analytic, there are no weights
to copy) and sCD is the only training it gets.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from scm_graph import trigflow
from scm_graph.objectives import sct
from scm_graph.objectives.common import StepInputs
from scm_graph.objectives.scd import scd_loss
from scm_graph.sample.samplers import consistency_times, sample_consistency
from scm_graph.spec import ObjectiveSpec
from tests.helpers import TorchDefaults
from tests.objectives.mog import (
    Component,
    MLPStudent,
    MoG,
    MoGTeacher,
    integrate_guided_ode,
)

pytestmark = pytest.mark.usefixtures("torch_defaults")

SD = 0.5
# Three classes, one anisotropic Gaussian each, means ~5 component stds apart; overall std ~ sigma_d.
MOG = MoG([
    Component(0, 1.0, (-0.55, 0.35), (0.15, 0.22)),
    Component(1, 1.0, (0.6, 0.3), (0.22, 0.15)),
    Component(2, 1.0, (0.1, -0.6), (0.12, 0.20)),
], class_weights=(0.45, 0.35, 0.2))
K = 3

# The training budget: 1500 Adam steps of 1024 samples, lr 2e-3 decayed linearly to 0, tangent warmup over the
# first 300 steps; the package's defaults for everything else (P_mean -1, P_std 1.4, c = 0.1, adaptive weighting).
STEPS, BATCH, LR, WARMUP = 1500, 1024, 2e-3, 300
CONTINUE, CONTINUE_LR = 300, 5e-4  # the fault checks: 300 steps more from the trained student (lr 5e-4 -> 0), with and without a fault
CFG = ObjectiveSpec(kind="scd", teacher="analytic", sigma_d=SD, warmup_images=WARMUP * BATCH)
N_EVAL = 5_000  # samples per class at s = 1
N_ODE = 1_000  # of which compared with the exact guided PF-ODE at s = 2
RK4_STEPS = 50  # the reference ODE: RK4 at 50 steps is within 2e-7 of 800 steps (checked below against 200)


# --- the teacher is exact ---------------------------------------------------------------------------------------


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.6
    t = 0.05 + (math.pi / 2 - 0.1) * torch.rand(n, generator=g, dtype=torch.float64)
    return x, t


@pytest.mark.parametrize("label", [0, 2, -1])
def test_mog_velocity_satisfies_the_continuity_equation(label: int):
    """d/dt log p_t + div v + v . grad log p_t = 0 (central differences of the analytic log-density): the
    velocity transports the law of x_t = cos t x0 + sin t z, for a class and for the mixture (-1)."""
    x, t = _points()
    labels = torch.full((x.shape[0],), label)
    logp = lambda x, t: MOG.log_density(x, t, SD, labels)
    v = lambda x: MOG.velocity(x, t, SD, labels)
    h = 1e-5
    dlogp_dt = (logp(x, t + h) - logp(x, t - h)) / (2 * h)
    div, grad_logp = torch.zeros_like(t), torch.zeros_like(x)
    for i in range(2):
        e = torch.zeros_like(x)
        e[:, i] = h
        div += (v(x + e)[:, i] - v(x - e)[:, i]) / (2 * h)
        grad_logp[:, i] = (logp(x + e, t) - logp(x - e, t)) / (2 * h)
    residual = dlogp_dt + div + (v(x) * grad_logp).sum(1)
    assert residual.abs().max() < 1e-6, residual.abs().max()
    wrong = dlogp_dt + div - (v(x) * grad_logp).sum(1)  # the check can fail: -v does not transport p_t
    assert wrong.abs().max() > 1e-2


def test_mog_class_velocity_is_the_gaussian_flow():
    """A one-Gaussian class has the affine PF-ODE flow phi_t(x0) = cos t mu + std_t / s (x0 - mu) (elementwise,
    std_t^2 = cos^2 t s^2 + sin^2 t sigma_d^2): the velocity at phi_t(x0) is d phi_t / dt, and the teacher
    returns it divided by sigma_d."""
    x0, t = _points()
    labels = torch.full((x0.shape[0],), 1)
    mu, s2 = MOG.mu[1], MOG.s2[1]
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    std = (c**2 * s2 + s**2 * SD**2).sqrt()
    x_t = c * mu + std / s2.sqrt() * (x0 - mu)
    dstd = s * c * (SD**2 - s2) / std
    want = -s * mu + dstd / s2.sqrt() * (x0 - mu)
    torch.testing.assert_close(MOG.velocity(x_t, t, SD, labels), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(MoGTeacher(MOG, SD)(x_t, t, labels) * SD, want, rtol=0, atol=1e-12)


def test_the_guided_reference_ode_is_converged():
    g = torch.Generator().manual_seed(3)
    x, labels = SD * torch.randn(256, 2, generator=g, dtype=torch.float64), torch.arange(256) % K
    t_max = trigflow.t_max(SD)
    a = integrate_guided_ode(MOG, x, t_max, 0.0, SD, labels, 2.0, RK4_STEPS)
    b = integrate_guided_ode(MOG, x, t_max, 0.0, SD, labels, 2.0, 4 * RK4_STEPS)
    assert (a - b).abs().max() < 1e-6


# --- faults to inject ----------------------------------------------------------------------------------------------


class Scaled(nn.Module):
    """The teacher with F multiplied by `factor`: -1 flips the velocity's sign, 1 / sigma_d makes
    `teacher_velocity` return F instead of sigma_d F."""

    def __init__(self, teacher: nn.Module, factor: float):
        super().__init__()
        self.teacher, self.factor, self.sigma_d = teacher, factor, teacher.sigma_d

    def forward(self, x_t, t, labels=None, dropout_key=None):
        return self.factor * self.teacher(x_t, t, labels)


def tangent_jvp_scaled(times: int):
    """`sct.tangent_jvp` re-written with the JVP rearrangement's cos t sin t applied `times` times to the tangents
    (x_t's and t's): 1 is the package's JVP (checked below), 2 the fault "tangent applied twice"."""

    def tangent_jvp(model, params, inp: StepInputs, x_t: Tensor, dxt: Tensor, keep_grad: bool = False):
        t = inp.t
        theta = params if keep_grad else {k: v.detach() for k, v in params.items()}
        cs = (torch.cos(t) * torch.sin(t)) ** times
        fn = lambda x, t_in: functional_call(model, theta, (x, t_in, inp.labels, inp.dropout_key, inp.guidance))
        F, dF = jvp(fn, (x_t, t), (trigflow.expand(cs, x_t) * dxt, cs))
        return (F if keep_grad else F.detach()), dF.detach()

    return tangent_jvp


def test_the_rewritten_tangent_is_the_packages():
    torch.manual_seed(0)
    student = MLPStudent(2, K, SD).double()
    g = torch.Generator().manual_seed(0)
    x0, labels, _ = MOG.sample(8, g)
    z = SD * torch.randn(8, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 1.5, 8, dtype=torch.float64)
    inp = StepInputs(x0, z, t, labels, torch.tensor(0), torch.tensor(0.7, dtype=torch.float64),
                     torch.linspace(1, 2, 8, dtype=torch.float64))
    x_t, params = trigflow.noisy(x0, z, t), dict(student.named_parameters())
    dxt = MoGTeacher(MOG, SD)(x_t, t, labels) * SD
    for keep_grad in (False, True):
        want = sct.tangent_jvp(student, params, inp, x_t, dxt, keep_grad=keep_grad)
        for a, b in zip(tangent_jvp_scaled(1)(student, params, inp, x_t, dxt, keep_grad), want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert want[0].requires_grad == keep_grad
        assert not torch.allclose(tangent_jvp_scaled(2)(student, params, inp, x_t, dxt, keep_grad)[1], want[1])


# --- training and evaluation ---------------------------------------------------------------------------------------


def train(fault: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None, seed: int = 0, steps: int = STEPS,
          init: MLPStudent | None = None, lr: float = LR) -> MLPStudent:
    """sCD of the MoG teacher into a fresh MLPStudent (float32; the teacher computes in float64), or, from `init`,
    `steps` more steps with a fresh optimiser (the tangent warmup then over)."""
    teacher: nn.Module = MoGTeacher(MOG, SD)
    if fault == "sign":
        teacher = Scaled(teacher, -1.0)
    elif fault == "sigma_d":
        teacher = Scaled(teacher, 1.0 / SD)
    elif fault == "tangent_twice":
        monkeypatch.setattr(sct, "tangent_jvp", tangent_jvp_scaled(2))  # looked up at call time, by both paths
    else:
        assert fault is None
    torch.manual_seed(seed)
    student = MLPStudent(2, K, SD)
    if init is not None:
        student.load_state_dict(init.state_dict())
    params = dict(student.named_parameters())
    opt = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # the loop's draw_inputs recipe: z ~ N(0, sigma_d^2), tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d),
        # s ~ U[1, 2], r the tangent-warmup ratio
        x0, labels, _ = MOG.sample(BATCH, gen)
        z = torch.randn(BATCH, 2, generator=gen) * SD
        t = trigflow.sample_t(torch.randn(BATCH, generator=gen) * CFG.P_std + CFG.P_mean, SD)
        s = CFG.guidance[0] + (CFG.guidance[1] - CFG.guidance[0]) * torch.rand(BATCH, generator=gen)
        r = torch.tensor(1.0 if init is not None else min(1.0, step * BATCH / CFG.warmup_images))
        inp = StepInputs(x0.float(), z, t, labels, torch.tensor(step), r, s)
        out = scd_loss(student, params, inp, CFG, teacher)
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return student.eval()


def evaluate(student: MLPStudent, seed: int = 1) -> dict[str, float]:
    """The criteria's values: per class c and number of steps k at s = 1,
    `right/k/c` the fraction of samples whose nearest component (Mahalanobis) is the class's own,
    `mean/k/c`  max over coordinates of |sample mean - mu_c| / s_c,
    `std/k/c`   max over coordinates of |sample std / s_c - 1|,
    `corr/k/c`  |sample correlation| (the target's is 0);
    at s = 2, `ode/k` the mean absolute difference between the samples and the exact guided PF-ODE's endpoints."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(N_EVAL)
    n = labels.shape[0]
    ode = (torch.arange(n) % N_EVAL) < N_ODE  # the first N_ODE samples of each class
    out = {}
    for k in (1, 2):
        times = consistency_times(k, SD)
        noise = [torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in times]
        x = sample_consistency(student, [e.float() for e in noise], times, labels, guidance=1.0).double()
        maha = ((x[:, None] - MOG.mu[None]) ** 2 / MOG.s2[None]).sum(2)  # [n, components]
        for c in range(K):
            xs, mine = x[labels == c], labels == c
            out[f"right/{k}/{c}"] = (maha[mine].argmin(1) == c).double().mean().item()
            s_c = MOG.s2[c].sqrt()
            out[f"mean/{k}/{c}"] = ((xs.mean(0) - MOG.mu[c]).abs() / s_c).max().item()
            out[f"std/{k}/{c}"] = (xs.std(0) / s_c - 1).abs().max().item()
            out[f"corr/{k}/{c}"] = torch.corrcoef(xs.T)[0, 1].abs().item()
        # s = 2: the same noise through the exact guided PF-ODE (two steps: re-noise its endpoint at t_mid)
        noise, lab = [e[ode] for e in noise], labels[ode]
        x = sample_consistency(student, [e.float() for e in noise], times, lab, guidance=2.0).double()
        ref = integrate_guided_ode(MOG, SD * noise[0], times[0], 0.0, SD, lab, 2.0, RK4_STEPS)
        for t_i, e in zip(times[1:], noise[1:]):
            ref = integrate_guided_ode(MOG, math.cos(t_i) * ref + math.sin(t_i) * SD * e, t_i, 0.0, SD, lab, 2.0, RK4_STEPS)
        out[f"ode/{k}"] = (x - ref).abs().mean().item()
    return out


# Tolerances: about twice the worst value the good run reaches (in brackets: good run / the correct 300-step
# continuation; the faults reach, for sigma_d / tangent_twice / sign, the values after "faults").
TOL = {
    "right": 0.95,  # >= 95% of a class's samples nearest its own component [>= 0.998 / >= 0.998; faults 1.0 / 0.59 / 0.0]
    "mean": 0.35,  # sample mean within 0.35 s_c of mu_c; standard error at 5k samples 0.014 [0.12 / 0.09; faults 0.81 / 2.0 / 247]
    "std": 0.25,  # sample std within 25% of s_c per coordinate [0.15 / 0.14; faults 0.65 / 5.7 / 211]
    "corr": 0.15,  # |correlation| below 0.15 (the target's is 0; standard error 0.014) [0.078 / 0.081]
    "ode": 0.06,  # mean |sample - exact guided ODE endpoint| (s = 2) below 0.06 = 0.12 sigma_d, ~0.4 of the samples'
    # std [1 step 0.030 / 0.026, 2 steps 0.022 / 0.018; faults 0.13 / 0.63 / 6.5 (1 step)]
}


def violations(m: dict[str, float]) -> list[str]:
    bad = []
    for key, value in m.items():
        kind = key.split("/")[0]
        ok = value >= TOL[kind] if kind == "right" else value <= TOL[kind]
        if not ok:
            bad.append(f"{key}={value:.3f}")
    return bad


@pytest.fixture(scope="module")
def student():
    with TorchDefaults():  # a module fixture is set up before the function-scoped torch_defaults: one thread here too
        return train()


@pytest.mark.slow
def test_scd_student_samples_the_mixture_at_s1_and_the_guided_ode_at_s2(student):
    m = evaluate(student)
    print({k: round(v, 4) for k, v in m.items()})
    assert not violations(m), violations(m)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [None, "sign", "sigma_d", "tangent_twice"])
def test_a_faulty_scd_moves_the_student_off_the_target(student, fault: str | None, monkeypatch: pytest.MonkeyPatch):
    """From the trained student, CONTINUE steps more of sCD: the correct objective keeps it within the tolerances
    (the target is its fixed point), each fault drives it out (the target is not the faulty objective's fixed
    point). Same start, same steps, same randomness: only the fault differs."""
    m = evaluate(train(fault, monkeypatch, seed=1, steps=CONTINUE, init=student, lr=CONTINUE_LR))
    print(fault, {k: round(v, 4) for k, v in m.items()})
    if fault is None:
        assert not violations(m), violations(m)
    else:
        assert violations(m), f"{fault}: the criteria did not catch it"
        assert m["ode/1"] > TOL["ode"] and m["ode/2"] > TOL["ode"], m  # the s = 2 endpoints catch every fault
