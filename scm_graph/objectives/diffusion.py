"""TrigFlow diffusion loss with adaptive weighting (sCM Eq. 4 and Eq. 8): the teacher and baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.objectives.common import (
    ObjectiveOut,
    StepInputs,
    finite_samples,
    zero_unless,
)
from scm_graph.objectives.weighting import w_of, weighted
from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


def diffusion_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    prep = diffusion_prepare(model, params, inp, cfg)
    F = functional_call(model, params, prep.inputs.forward_args(prep.x_t))  # F_theta(x_t / sigma_d, t)
    return diffusion_finish(F, w_of(model, params, prep.inputs.t, cfg), prep)


@dataclass
class DiffusionPrep:
    """The gradient pass's inputs (non-finite samples zeroed) and its target."""

    inputs: StepInputs
    x_t: Tensor
    v_t: Tensor
    ok: Tensor  # [B] bool
    sigma_d: float


def diffusion_prepare(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> DiffusionPrep:
    """x_t and its velocity v_t; diffusion has no JVP pass, so this is cheap and needs no weights."""
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    v_t = trigflow.velocity(inp.x0, inp.z, inp.t)  # v_t = cos t z - sin t x0
    ok = finite_samples(x_t, v_t, inp.t)  # non-finite data never reaches the gradient pass
    x_t, v_t, t = zero_unless(ok, x_t), zero_unless(ok, v_t), zero_unless(ok, inp.t)
    inputs = StepInputs(inp.x0, inp.z, t, inp.labels, inp.dropout_key, inp.r, None)  # the model takes no guidance
    return DiffusionPrep(inputs, x_t, v_t, ok, model.sigma_d)


def diffusion_finish(F: Tensor, w: Tensor, prep: DiffusionPrep) -> ObjectiveOut:
    """e^w/D ||sigma_d F - v_t||^2 - w from the gradient pass's F_theta(x_t, t) and w_phi(t)."""
    x_t, v_t, ok = prep.x_t, prep.v_t, prep.ok
    F = F.to(x_t.dtype)
    with fp32_region(x_t):
        ok = ok & finite_samples(F)
        F = zero_unless(ok, F)  # a select: the masked samples pass back exact zeros, never 0 * inf
        mse = (prep.sigma_d * F - v_t).square().flatten(1).mean(1)  # (1/D)||sigma_d F - v_t||^2 (Eq. 4)
        loss = weighted(mse, w, ok)
    return ObjectiveOut(loss, mse.detach(), w.detach(), torch.zeros_like(mse), ~ok)
