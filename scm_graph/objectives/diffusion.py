"""TrigFlow diffusion loss with adaptive weighting (sCM Eq. 4 and Eq. 8): the teacher and baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.objectives.common import ObjectiveOut, StepInputs, finite_samples, zero_unless
from scm_graph.objectives.weighting import w_of, weighted
from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


def diffusion_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    sigma_d = model.sigma_d
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    v_t = trigflow.velocity(inp.x0, inp.z, inp.t)  # v_t = cos t z - sin t x0
    ok = finite_samples(x_t, v_t, inp.t)  # non-finite data never reaches the gradient pass
    x_t, v_t, t = zero_unless(ok, x_t), zero_unless(ok, v_t), zero_unless(ok, inp.t)
    F = functional_call(model, params, (x_t, t, inp.labels, inp.dropout_key)).to(x_t.dtype)  # F_theta(x_t / sigma_d, t)
    with fp32_region(x_t):
        ok = ok & finite_samples(F)
        F = zero_unless(ok, F)  # a select: the masked samples pass back exact zeros, never 0 * inf
        mse = (sigma_d * F - v_t).square().flatten(1).mean(1)  # (1/D)||sigma_d F - v_t||^2 (Eq. 4)
        w = w_of(model, params, t, cfg)
        loss = weighted(mse, w, ok)
    return ObjectiveOut(loss, mse.detach(), w.detach(), torch.zeros_like(mse), ~ok)
