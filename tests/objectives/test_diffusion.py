"""TrigFlow diffusion loss (sCM Eq. 4 + adaptive weighting Eq. 8) against an independent float64 computation."""

import math

import pytest
import torch

from scm_graph import trigflow
from scm_graph.objectives.diffusion import diffusion_loss
from scm_graph.spec import ObjectiveSpec
from tests.objectives.shared import SD, _grads, _inputs, _poison, _subset


def _reference(m, inp, sd: float):
    """(loss, mse [B], w [B], F [B, C, H, W]) sample by sample, with the backbone called directly."""
    mse, w, Fs = [], [], []
    for i in range(inp.x0.shape[0]):
        t = float(inp.t[i])
        x_t = math.cos(t) * inp.x0[i] + math.sin(t) * inp.z[i]  # x_t = cos t x0 + sin t z (sCM Eq. 2)
        v_t = math.cos(t) * inp.z[i] - math.sin(t) * inp.x0[i]  # v_t = cos t z - sin t x0 (sCM Eq. 4)
        F = m.net((x_t / sd)[None], inp.t[i : i + 1], inp.labels[i : i + 1])[0]  # F_theta(x_t / sigma_d, c_noise(t) = t) (Sec. 4.1)
        mse.append((sd * F - v_t).square().mean())  # (1/D) ||sigma_d F - v_t||^2 (Eq. 4)
        emb = m.w_phi.emb(inp.t[i : i + 1])[0]
        w.append(m.w_phi.linear.weight[0] @ emb + m.w_phi.linear.bias[0])  # w_phi(t) = a^T emb(t) + b (Eq. 8)
        Fs.append(F)
    mse, w = torch.stack(mse), torch.stack(w)
    loss = (torch.exp(w) * mse - w).mean()  # (1/B) sum_i e^{w_i} mse_i - w_i (Eq. 8)
    return loss, mse, w, torch.stack(Fs)


@pytest.mark.parametrize("sd", [SD, 0.7])
def test_diffusion_loss_matches_independent_reference(tiny_model64, sd: float):
    """Loss, per-sample mse, w and the gradient w.r.t. every parameter (net and w_phi) against a per-sample
    float64 computation with F != 0 and w_phi != 0; sigma_d = 0.7 (model and data) shows any slip between
    x_t / sigma_d, x_t * sigma_d or a missing sigma_d."""
    m = tiny_model64
    m.sigma_d = sd
    with torch.no_grad():
        m.w_phi.linear.bias.fill_(0.3)  # w_phi(t) = 0.31, 0.20, 0.09: non-zero, per-sample
    params = dict(m.named_parameters())
    inp = _inputs(sd=sd)
    out = diffusion_loss(m, params, inp, ObjectiveSpec(sigma_d=sd))
    loss, mse, w, F = _reference(m, inp, sd)
    assert F.abs().max().item() > 1e-2 and w.abs().min().item() > 1e-2  # the reference is not degenerate
    assert torch.allclose(out.mse, mse, rtol=1e-10, atol=0)
    assert torch.allclose(out.w, w, rtol=1e-10, atol=0)
    assert torch.allclose(out.loss, loss, rtol=1e-10, atol=0)
    assert not out.nonfinite.any() and not out.tangent_norm.any()
    names = list(params)
    got = torch.autograd.grad(out.loss, [params[k] for k in names])
    ref = torch.autograd.grad(loss, [params[k] for k in names])
    for k, a, b in zip(names, got, ref):
        assert b.abs().max() > 0, k  # every parameter gets a gradient
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12 * b.abs().max()), k


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
    # a masked sample counts as a zero in the batch mean (so a split batch averages exactly): 2 of 3 samples
    assert torch.allclose(out.loss, ref.loss * 2 / 3, rtol=1e-12)
    assert torch.allclose(grads, _grads(m, ref.loss * 2 / 3), rtol=1e-10, atol=1e-14)
    # and a poisoned prediction on finite data: masked too, gradients stay finite
    _poison(m, 2)
    out = diffusion_loss(m, params, _inputs(), cfg)
    assert out.nonfinite.tolist() == [False, False, True]
    assert torch.isfinite(out.loss) and torch.isfinite(_grads(m, out.loss)).all()
