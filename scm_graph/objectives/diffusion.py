"""TrigFlow diffusion loss with adaptive weighting (sCM Eq. 4 and Eq. 8): the teacher and baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.nets.layers import fp32_region
from scm_graph.objectives import ObjectiveOut, StepInputs, finite_samples, zero_unless
from scm_graph.spec import ObjectiveSpec


def weighted(mse: Tensor, w: Tensor, ok: Tensor | None = None) -> Tensor:
    """Adaptive weighting: e^{w_phi(t)} * (1/D)||.||^2 - w_phi(t), averaged over the batch (Eq. 8).

    With `ok` ([B] bool) the masked samples get weight 0 and the mean runs over the finite ones only.
    """
    per_sample = torch.exp(w) * mse - w  # Eq. 8
    if ok is None:
        return per_sample.mean()
    return torch.where(ok, per_sample, 0.0).sum() / ok.sum().clamp(min=1)


def w_of(model: nn.Module, params: dict[str, Tensor], t: Tensor, cfg: ObjectiveSpec) -> Tensor:
    """w_phi(t), always in float32 (autocast off: a time-embedding path, DESIGN.md Sec. 2)."""
    if not cfg.adaptive_weighting:
        return torch.zeros_like(t)
    with fp32_region(t):
        return functional_call(model.w_phi, {k[6:]: v for k, v in params.items() if k.startswith("w_phi.")}, (t,))


def diffusion_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    sigma_d = cfg.sigma_d
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    v_t = trigflow.velocity(inp.x0, inp.z, inp.t)  # v_t = cos t z - sin t x0
    ok = finite_samples(x_t, v_t, inp.t)  # non-finite data never reaches the gradient pass
    x_t, v_t, t = zero_unless(ok, x_t), zero_unless(ok, v_t), zero_unless(ok, inp.t)
    F = functional_call(model, params, (x_t / sigma_d, t, inp.labels, inp.dropout_key)).to(x_t.dtype)
    with fp32_region(x_t):
        ok = ok & finite_samples(F)
        F = zero_unless(ok, F)  # a select: the masked samples pass back exact zeros, never 0 * inf
        mse = (sigma_d * F - v_t).square().flatten(1).mean(1)  # (1/D)||sigma_d F - v_t||^2 (Eq. 4)
        w = w_of(model, params, t, cfg)
        loss = weighted(mse, w, ok)
    return ObjectiveOut(loss, mse.detach(), w.detach(), torch.zeros_like(mse), ~ok)
