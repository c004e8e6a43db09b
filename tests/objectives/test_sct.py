"""sCT and diffusion objectives against finite differences and the discrete-time limit (float64)."""

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call, jvp

from scm_graph import trigflow
from scm_graph.objectives import StepInputs
from scm_graph.objectives.diffusion import diffusion_loss
from scm_graph.objectives.sct import sct_loss, tangent
from scm_graph.spec import ObjectiveSpec

SD = 0.5


def _inputs(B=3, seed=0, r=1.0, labels=True, sd=SD):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    z = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    t = torch.tensor([0.3, 0.9, 1.35], dtype=torch.float64)[:B]
    lab = torch.arange(B) if labels else None
    return StepInputs(x0, z, t, lab, torch.tensor(7), torch.tensor(r, dtype=torch.float64))


def test_jvp_matches_central_difference(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs()
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    dxt = trigflow.velocity(inp.x0, inp.z, inp.t)
    fn = lambda x, t: functional_call(m, params, (x, t, inp.labels))  # F_theta(x / sigma_d, t)
    _, dF = jvp(fn, (x_t, inp.t), (dxt, torch.ones_like(inp.t)))
    h = 1e-5
    fd = (fn(x_t + h * dxt, inp.t + h) - fn(x_t - h * dxt, inp.t - h)) / (2 * h)
    assert torch.allclose(dF, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sd", [SD, 0.7])
def test_g_is_cos_t_times_df_dt_along_the_path(tiny_model64, sd: float):
    """g (r = 1) equals cos(t) d/dt f^-(x_t, t) along x_t = cos t x0 + sin t z; catches sigma_d slips
    (0.7: a sigma_d whose reciprocal is not a power of two, in the model and in the data)."""
    m = tiny_model64
    m.sigma_d = sd
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=sd)
    inp = _inputs(sd=sd)
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    dxt = trigflow.velocity(inp.x0, inp.z, inp.t)
    _, g = tangent(m, params, inp, x_t, dxt, cfg)

    def f_along(t):
        xs = trigflow.noisy(inp.x0, inp.z, t)
        return trigflow.consistency_fn(xs, t, functional_call(m, params, (xs, t, inp.labels)), sd)

    h = 1e-5
    df_dt = (f_along(inp.t + h) - f_along(inp.t - h)) / (2 * h)
    assert torch.allclose(g, trigflow.expand(torch.cos(inp.t), g) * df_dt, rtol=1e-6, atol=1e-9)
    # r = 0 keeps only the first term -cos^2 t (sigma_d F^- - dx_t/dt)
    _, g0 = tangent(m, params, dataclasses.replace(inp, r=torch.tensor(0.0, dtype=torch.float64)), x_t, dxt, cfg)
    F = functional_call(m, params, (x_t, inp.t, inp.labels))
    assert torch.allclose(g0, -trigflow.expand(torch.cos(inp.t) ** 2, g) * (sd * F - dxt))


def _grads(m, loss):
    ps = [p for n, p in m.named_parameters() if n.startswith("net.")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps)])


def test_sct_gradient_is_the_continuous_limit_of_discrete_cm(tiny_model64):
    """grad L_sCT = lim_{dt->0} grad of the discrete CM loss with weights 2/(D sigma_d tan t (||g||+c) 2dt).

    Discrete (Song et al. 2023, Remark 10): (1/2dt) ||f_theta(x_t, t) - f_theta^-(x_{t-dt}, t-dt)||^2 along
    the same (x0, z) path has gradient -> grad f_theta^T df^-/dt = -sin t sigma_d grad F^T df/dt; sCT's is
    -(2/D) grad F^T g / (||g|| + c) with g = cos t df/dt.
    """
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD, adaptive_weighting=False, tangent_c=0.1)
    inp = _inputs()
    out = sct_loss(m, params, inp, cfg)
    g_sct = _grads(m, out.loss)
    D = inp.x0[0].numel()
    K = 2.0 / (D * SD * torch.tan(inp.t) * (out.tangent_norm + cfg.tangent_c))

    def f(p, t, detach):
        x = trigflow.noisy(inp.x0, inp.z, t)
        pp = {k: v.detach() for k, v in p.items()} if detach else p
        return trigflow.consistency_fn(x, t, functional_call(m, pp, (x, t, inp.labels)), SD)

    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        diff = f(params, inp.t, False) - f(params, inp.t - dt, True)
        L_disc = (K / (2 * dt) * diff.square().flatten(1).sum(1)).mean()
        g_disc = _grads(m, L_disc)
        errs.append(((g_disc - g_sct).norm() / g_sct.norm()).item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-3, errs


def test_sct_value_is_normalized_tangent_norm_and_w_gradient(tiny_model64):
    """At theta = theta^- the residual is -g/(||g||+c): mse = (||g||/(||g||+c))^2 / D."""
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD)
    out = sct_loss(m, params, _inputs(), cfg)
    D = 64
    expect = (out.tangent_norm / (out.tangent_norm + 0.1)) ** 2 / D
    assert torch.allclose(out.mse, expect, rtol=1e-10)
    w = m.w_phi(_inputs().t)
    assert torch.allclose(out.loss, (torch.exp(w) * expect - w).mean())


def test_tangent_clip_option(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    out = sct_loss(m, params, _inputs(), ObjectiveSpec(sigma_d=SD, tangent_clip=True, adaptive_weighting=False))
    inp = _inputs()
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    _, g = tangent(m, params, inp, x_t, trigflow.velocity(inp.x0, inp.z, inp.t), ObjectiveSpec(sigma_d=SD))
    assert torch.allclose(out.mse, g.clamp(-1, 1).square().flatten(1).mean(1))


def test_diffusion_loss_closed_form_and_adaptive_weight_gradient(tiny_model64):
    m = tiny_model64
    with torch.no_grad():
        m.net.conv_out.weight.zero_()
        m.net.conv_out.bias.zero_()  # F == 0 exactly
        m.w_phi.linear.weight.zero_()
        m.w_phi.linear.bias.fill_(0.3)  # w_phi(t) == 0.3
    params = dict(m.named_parameters())
    inp = _inputs()
    out = diffusion_loss(m, params, inp, ObjectiveSpec(sigma_d=SD))
    v = trigflow.velocity(inp.x0, inp.z, inp.t)
    mse = v.square().flatten(1).mean(1)
    assert torch.allclose(out.mse, mse)
    assert torch.allclose(out.loss, (math.exp(0.3) * mse - 0.3).mean())
    (gb,) = torch.autograd.grad(out.loss, [params["w_phi.linear.bias"]])
    assert torch.allclose(gb, (math.exp(0.3) * mse - 1).mean().reshape(1))  # d/dw (e^w mse - w)


def test_dropout_masks_shared_between_jvp_and_gradient_pass():
    """With keyed dropout, F^- (in the JVP) and F_theta see the same mask: the residual equals -g exactly."""
    from scm_graph.model import build_model
    from tests.helpers import tiny_spec

    torch.manual_seed(0)
    m = build_model(tiny_spec(dropout=0.5)).double().train()
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.1)
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD, adaptive_weighting=False)
    out = sct_loss(m, params, _inputs(), cfg)
    assert torch.allclose(out.mse, (out.tangent_norm / (out.tangent_norm + 0.1)) ** 2 / 64, rtol=1e-10)
    # and the mask really depends on the key
    inp = _inputs()
    a = m(inp.x0, inp.t, inp.labels, torch.tensor(1))
    b = m(inp.x0, inp.t, inp.labels, torch.tensor(2))
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- non-finite samples


def _poison(m, sample: int, B: int = 3):
    """Make the network's output inf on one sample (finite inputs): a tangent that overflows."""
    inner = m.net.forward
    bad = torch.zeros(B, 1, 1, 1, dtype=torch.float64)
    bad[sample] = float("inf")
    m.net.forward = lambda *a: inner(*a) + bad
    return inner


def _subset(inp: StepInputs, keep: list[int]) -> StepInputs:
    lab = inp.labels[keep] if inp.labels is not None else None
    return StepInputs(inp.x0[keep], inp.z[keep], inp.t[keep], lab, inp.dropout_key, inp.r)


def test_sct_masks_a_nonfinite_tangent_and_trains_the_rest(tiny_model64):
    """F^- = inf on sample 1: masked (g := 0, weight 0); loss and gradient equal those of samples 0 and 2 alone."""
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD)
    inp = _inputs()
    inner = _poison(m, 1)
    out = sct_loss(m, params, inp, cfg)
    assert out.nonfinite.tolist() == [False, True, False]
    assert torch.isfinite(out.loss) and out.tangent_norm[1] == 0 and out.mse[1] == 0
    grads = _grads(m, out.loss)
    assert torch.isfinite(grads).all()
    m.net.forward = inner
    ref = sct_loss(m, params, _subset(inp, [0, 2]), cfg)
    assert not ref.nonfinite.any()
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12)
    assert torch.allclose(out.tangent_norm[[0, 2]], ref.tangent_norm, rtol=1e-12)
    assert torch.allclose(grads, _grads(m, ref.loss), rtol=1e-10, atol=1e-14)


def test_diffusion_masks_nonfinite_data(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD)
    inp = _inputs()
    inp.z[0, 0, 2, 2] = float("nan")
    out = diffusion_loss(m, params, inp, cfg)
    assert out.nonfinite.tolist() == [True, False, False] and out.mse[0] == 0
    grads = _grads(m, out.loss)
    ref = diffusion_loss(m, params, _subset(inp, [1, 2]), cfg)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12)
    assert torch.allclose(grads, _grads(m, ref.loss), rtol=1e-10, atol=1e-14)
    # and a poisoned prediction on finite data: masked too, gradients stay finite
    _poison(m, 2)
    out = diffusion_loss(m, params, _inputs(), cfg)
    assert out.nonfinite.tolist() == [False, False, True]
    assert torch.isfinite(out.loss) and torch.isfinite(_grads(m, out.loss)).all()


def test_objectives_report_no_nonfinite_on_clean_data(tiny_model64):
    params = dict(tiny_model64.named_parameters())
    for fn in (sct_loss, diffusion_loss):
        out = fn(tiny_model64, params, _inputs(), ObjectiveSpec(sigma_d=SD))
        assert out.nonfinite.dtype == torch.bool and out.nonfinite.shape == (3,) and not out.nonfinite.any()
