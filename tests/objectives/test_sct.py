"""The sCT objective against finite differences, closed forms at theta = theta^- and the discrete-time limit
(float64); the diffusion loss is in test_diffusion.py."""

import dataclasses

import pytest
import torch
from torch.func import functional_call, jvp

from scm_graph import trigflow
from scm_graph.objectives.diffusion import diffusion_loss
from scm_graph.objectives.sct import sct_loss, tangent
from scm_graph.spec import ObjectiveSpec
from tests.objectives.shared import SD, _grads, _inputs, _poison, _subset


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
    """At theta = theta^- the residual is -g/(||g||+c): mse = (||g||/(||g||+c))^2 / D.

    Gradients there, against closed forms (autograd of `sct_loss(...).loss` vs):
    w_phi: dL/dw_i = (e^{w_i} mse_i - 1) / B chained through w_phi(t) = a^T emb(t) + b;
    network: the gradient of mean_i e^{w_i} (-2/D) <stopgrad(g_i / (||g_i|| + c)), F_theta(x_t_i)>, with g from
    a central difference of f along the path (g = cos t df/dt at r = 1) and F_theta from calling the model.
    """
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD)
    out = sct_loss(m, params, _inputs(), cfg)
    D = 64
    expect = (out.tangent_norm / (out.tangent_norm + 0.1)) ** 2 / D
    assert torch.allclose(out.mse, expect, rtol=1e-10)
    w = m.w_phi(_inputs().t)
    assert torch.allclose(out.loss, (torch.exp(w) * expect - w).mean())

    inp = _inputs()
    B = inp.t.shape[0]
    names = list(params)
    grads = dict(zip(names, torch.autograd.grad(out.loss, [params[k] for k in names])))
    # (a) w_phi parameters
    with torch.no_grad():
        dL_dw = (torch.exp(w) * expect - 1) / B  # d/dw_i (1/B) sum_j (e^{w_j} mse_j - w_j), Eq. 8
        emb = m.w_phi.emb(inp.t)  # [B, 128]; c_noise(t) = t
    assert dL_dw.abs().min().item() > 1e-4  # a non-degenerate closed form
    assert torch.allclose(grads["w_phi.linear.bias"], dL_dw.sum().reshape(1), rtol=1e-10, atol=0)  # dw_i/db = 1
    assert torch.allclose(grads["w_phi.linear.weight"], (dL_dw[:, None] * emb).sum(0, keepdim=True), rtol=1e-10, atol=1e-15)  # dw_i/da = emb(t_i)
    # (b) network parameters
    cos, sin = torch.cos(inp.t)[:, None, None, None], torch.sin(inp.t)[:, None, None, None]
    x_t = cos * inp.x0 + sin * inp.z  # x_t = cos t x0 + sin t z (Eq. 2)

    def f_along(t):
        c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
        xs = c * inp.x0 + s * inp.z  # x_t along the same (x0, z) path
        return c * xs - s * SD * m(xs, t, inp.labels, inp.dropout_key)  # f = cos t x_t - sin t sigma_d F (Eq. 5)

    h = 1e-5
    with torch.no_grad():
        g = cos * (f_along(inp.t + h) - f_along(inp.t - h)) / (2 * h)  # g = cos t df^-/dt (Algorithm 1, r = 1)
        g_n = g / (g.flatten(1).norm(dim=1) + cfg.tangent_c)[:, None, None, None]  # g / (||g|| + c) (Sec. 4.2)
    F = m(x_t, inp.t, inp.labels, inp.dropout_key)  # F_theta(x_t / sigma_d, t)
    surrogate = (torch.exp(w.detach()) * (-2 / D) * (g_n * F).flatten(1).sum(1)).mean()  # dL/dF_i = -(2/B)(e^{w_i}/D) g_n_i at F = F^-
    net = [k for k in names if k.startswith("net.")]
    ref = dict(zip(net, torch.autograd.grad(surrogate, [params[k] for k in net])))
    scale = max(r.abs().max() for r in ref.values())
    for k in net:
        assert torch.allclose(grads[k], ref[k], rtol=1e-6, atol=1e-9 * scale), k
    assert set(names) == set(net) | {"w_phi.linear.weight", "w_phi.linear.bias"}  # every parameter was checked


def test_tangent_clip_option(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    out = sct_loss(m, params, _inputs(), ObjectiveSpec(sigma_d=SD, tangent_clip=True, adaptive_weighting=False))
    inp = _inputs()
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    _, g = tangent(m, params, inp, x_t, trigflow.velocity(inp.x0, inp.z, inp.t), ObjectiveSpec(sigma_d=SD))
    assert torch.allclose(out.mse, g.clamp(-1, 1).square().flatten(1).mean(1))


def test_tangent_normalisation_off_trains_on_the_raw_tangent(tiny_model64):
    """objective.tangent_normalize false (sCM Fig. 5a, 'raw tangents'): at theta = theta^- the residual is g itself."""
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs()
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    _, g = tangent(m, params, inp, x_t, trigflow.velocity(inp.x0, inp.z, inp.t), ObjectiveSpec(sigma_d=SD))
    raw = sct_loss(m, params, inp, ObjectiveSpec(sigma_d=SD, tangent_normalize=False, adaptive_weighting=False))
    assert torch.allclose(raw.mse, g.square().flatten(1).mean(1), rtol=1e-12)
    normed = sct_loss(m, params, inp, ObjectiveSpec(sigma_d=SD, adaptive_weighting=False))
    n = g.flatten(1).norm(dim=1)
    assert torch.allclose(normed.mse, (n / (n + 0.1)) ** 2 / 64, rtol=1e-10)  # on: ||g / (||g|| + c)||^2 / D
    clipped = sct_loss(m, params, inp, ObjectiveSpec(sigma_d=SD, tangent_normalize=False, tangent_clip=True, adaptive_weighting=False))
    assert torch.allclose(clipped.mse, g.clamp(-1, 1).square().flatten(1).mean(1))  # clip wins over off


def test_adaptive_weighting_switch(tiny_model64):
    """objective.adaptive_weighting false: w = 0 and the loss is the plain mean of (1/D)||.||^2; on: e^w mse - w."""
    m = tiny_model64
    params = dict(m.named_parameters())
    off = sct_loss(m, params, _inputs(), ObjectiveSpec(sigma_d=SD, adaptive_weighting=False))
    on = sct_loss(m, params, _inputs(), ObjectiveSpec(sigma_d=SD))
    assert torch.equal(off.w, torch.zeros_like(off.w)) and torch.allclose(off.loss, off.mse.mean())
    assert (on.w != 0).all() and torch.allclose(on.loss, (torch.exp(on.w) * on.mse - on.w).mean())


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


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_the_fused_gradient_pass_is_the_two_pass_objective(arch):
    """Single-process sCT on an accelerator takes F_theta from the JVP's own primal output (one forward fewer); loss
    and gradients equal Algorithm 1's two passes (a no-gradient JVP, then a forward of its own), with dropout and attention on."""
    from scm_graph.model import build_model
    from scm_graph.objectives.sct import _prepare, consistency_finish, consistency_prepare, fuses, sct_velocity
    from scm_graph.objectives.weighting import w_of
    from tests.helpers import tiny_spec

    torch.manual_seed(0)
    m = build_model(tiny_spec(arch, dropout=0.3)).double().train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no zero-initialised output layer: every weight gets a gradient
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD)
    inp = _inputs()
    forwards = []
    hook = m.net.register_forward_hook(lambda *_: forwards.append(1))
    prep_f, F_f = _prepare(m, params, inp, cfg, sct_velocity, None, fuse=True)
    fused = consistency_finish(F_f, w_of(m, params, prep_f.inputs.t, cfg), prep_f)
    assert len(forwards) == 1  # the fused path: one network call (the JVP), no second forward
    hook.remove()
    assert not fuses(inp.x0, None)  # on the CPU sct_loss takes the two passes (faster there, docs/bench_step_cpu.md)
    assert fuses(inp.x0, None, "on") and not fuses(inp.x0.to("meta"), None, "off") and fuses(inp.x0.to("meta"), None)
    assert not fuses(inp.x0, lambda *a: None, "on")  # a finite-difference tangent has no primal output to reuse
    on = sct_loss(m, params, inp, dataclasses.replace(cfg, fused_pass="on"))
    torch.testing.assert_close(on.loss, fused.loss, rtol=0, atol=0)  # objective.fused_pass 'on' is this path
    torch.testing.assert_close(sct_loss(m, params, inp, cfg).loss, fused.loss, rtol=1e-12, atol=1e-14)
    prep = consistency_prepare(m, params, inp, cfg, sct_velocity)
    F = functional_call(m, params, prep.inputs.forward_args(prep.x_t))
    two = consistency_finish(F, w_of(m, params, prep.inputs.t, cfg), prep)
    torch.testing.assert_close(fused.loss, two.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused.mse, two.mse, rtol=1e-10, atol=1e-14)
    ps = list(params.values())
    g_fused, g_two = torch.autograd.grad(fused.loss, ps), torch.autograd.grad(two.loss, ps)
    assert sum(g.abs().sum() for g in g_two) > 0
    for a, b in zip(g_fused, g_two):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # no gradient wanted: never fused
        assert not fuses(inp.x0.to("meta"), None) and not fuses(inp.x0, None, "on")


# ----------------------------------------------------------------------------- non-finite samples


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
    # a masked sample counts as a zero in the batch mean (so a split batch averages exactly): 2 of 3 samples
    assert torch.allclose(out.loss, ref.loss * 2 / 3, rtol=1e-12)
    assert torch.allclose(out.tangent_norm[[0, 2]], ref.tangent_norm, rtol=1e-12)
    assert torch.allclose(grads, _grads(m, ref.loss * 2 / 3), rtol=1e-10, atol=1e-14)


def test_objectives_report_no_nonfinite_on_clean_data(tiny_model64):
    params = dict(tiny_model64.named_parameters())
    for fn in (sct_loss, diffusion_loss):
        out = fn(tiny_model64, params, _inputs(), ObjectiveSpec(sigma_d=SD))
        assert out.nonfinite.dtype == torch.bool and out.nonfinite.shape == (3,) and not out.nonfinite.any()
