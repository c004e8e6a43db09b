"""Discrete-time sCM (objective.kind 'discrete'): its gradient tends to sCT's as the grid refines (float64),
its finite difference is the JVP's in the limit, and the loop puts t on the grid."""

import dataclasses
import math

import pytest
import torch

from scm_graph import trigflow
from scm_graph.objectives import get_objective, get_passes
from scm_graph.objectives.discrete import discrete_loss, finite_difference_tangent, grid_step, snap_to_grid
from scm_graph.objectives.sct import sct_loss, tangent
from scm_graph.spec import ObjectiveSpec
from tests.objectives.shared import SD, _grads, _inputs


@pytest.mark.parametrize("r", [1.0, 0.3])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradient_tends_to_sct_as_n_grows(tiny_model64, r, normalize):
    """|grad L_discrete(N) - grad L_sCT| / |grad L_sCT| falls like 1/N (one-sided difference) and is small at N = 10^5."""
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs(r=r)
    cfg = ObjectiveSpec(sigma_d=SD, tangent_normalize=normalize)
    g_sct = _grads(m, sct_loss(m, params, inp, cfg).loss)
    errs = []
    for n in (10, 100, 1000, 100_000):
        out = discrete_loss(m, params, inp, dataclasses.replace(cfg, kind="discrete", N=n))
        errs.append(((_grads(m, out.loss) - g_sct).norm() / g_sct.norm()).item())
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[2] < 0.2 * errs[1] and errs[1] < 0.2 * errs[0], errs  # first order: ~10x per 10x in N
    assert errs[3] < 1e-4, errs


def test_finite_difference_tangent_matches_the_jvp_to_first_order(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs()
    x_t, dxt = trigflow.noisy(inp.x0, inp.z, inp.t), trigflow.velocity(inp.x0, inp.z, inp.t)
    cfg = ObjectiveSpec(sigma_d=SD, kind="discrete")
    F_jvp, g_jvp = tangent(m, params, inp, x_t, dxt, cfg)
    for n, tol in ((1000, 1e-2), (100_000, 1e-4)):
        F_fd, g_fd = finite_difference_tangent(m, params, inp, x_t, dxt, dataclasses.replace(cfg, N=n))
        assert torch.equal(F_fd, F_jvp)  # F^- is the same forward
        assert ((g_fd - g_jvp).norm() / g_jvp.norm()).item() < tol


def test_below_one_step_the_difference_reaches_the_boundary(tiny_model64):
    """t < Delta t: t' = 0, where x_0 = x0 (the difference spans t, not Delta t)."""
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = dataclasses.replace(_inputs(B=1), t=torch.tensor([0.01], dtype=torch.float64))
    cfg = ObjectiveSpec(sigma_d=SD, kind="discrete", N=10)  # Delta t ~ 0.156 > 0.01
    x_t, dxt = trigflow.noisy(inp.x0, inp.z, inp.t), trigflow.velocity(inp.x0, inp.z, inp.t)
    _, g = finite_difference_tangent(m, params, inp, x_t, dxt, cfg)
    F0 = m(inp.x0, torch.zeros(1, dtype=torch.float64), inp.labels)
    Ft = m(x_t, inp.t, inp.labels)
    t = inp.t
    dF = math.cos(0.01) * math.sin(0.01) * (Ft - F0) / 0.01
    want = -torch.cos(t) ** 2 * (SD * Ft - dxt) - (torch.cos(t) * torch.sin(t) * x_t + SD * dF)  # Algorithm 1's g, r = 1
    assert torch.allclose(g, want.detach(), rtol=1e-10, atol=1e-12)


def test_snap_to_grid():
    cfg = ObjectiveSpec(kind="discrete", N=40)
    dt = grid_step(cfg, SD)
    assert dt == pytest.approx(trigflow.t_max(SD) / 40)
    t = torch.tensor([1e-4, 0.3, dt, 1.5, trigflow.t_max(SD), 1.57])
    s = snap_to_grid(t, cfg, SD)
    i = s / dt
    assert torch.allclose(i, i.round()) and (i >= 1).all() and (i <= 40).all()
    assert (s >= t - 1e-6)[:-1].all()  # moved up to the grid point above (the last is clamped to t_max)
    assert s[2].item() == pytest.approx(dt) and s[-1].item() == pytest.approx(trigflow.t_max(SD))


def test_registered_and_cut_in_two_passes(tiny_model64):
    """get_objective('discrete') is the discrete loss, and its two passes (DDP / FSDP) give the same loss."""
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs()
    cfg = ObjectiveSpec(sigma_d=SD, kind="discrete", N=40)
    whole = get_objective("discrete")(m, params, inp, cfg)
    passes = get_passes("discrete")
    prep = passes.prepare(m, params, inp, cfg)
    F, w = m(*prep.inputs.forward_args(prep.x_t), weight=True)
    cut = passes.finish(F, w, prep)
    assert torch.allclose(whole.loss, cut.loss, rtol=1e-12)
    sct = sct_loss(m, params, inp, dataclasses.replace(cfg, kind="sct"))
    assert not torch.allclose(whole.tangent_norm, sct.tangent_norm, rtol=1e-6)  # a different tangent: not sCT's
