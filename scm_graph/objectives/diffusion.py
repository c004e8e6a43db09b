"""TrigFlow diffusion loss with adaptive weighting (sCM Eq. 4 and Eq. 8): the teacher and baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.objectives import ObjectiveOut, StepInputs
from scm_graph.spec import ObjectiveSpec


def weighted(mse: Tensor, w: Tensor) -> Tensor:
    """Adaptive weighting: e^{w_phi(t)} * (1/D)||.||^2 - w_phi(t), averaged over the batch (Eq. 8)."""
    return (torch.exp(w) * mse - w).mean()


def w_of(model: nn.Module, params: dict[str, Tensor], t: Tensor, cfg: ObjectiveSpec) -> Tensor:
    if not cfg.adaptive_weighting:
        return torch.zeros_like(t)
    return functional_call(model.w_phi, {k[6:]: v for k, v in params.items() if k.startswith("w_phi.")}, (t,))


def diffusion_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    sigma_d = cfg.sigma_d
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    v_t = trigflow.velocity(inp.x0, inp.z, inp.t)  # v_t = cos t z - sin t x0
    F = functional_call(model, params, (x_t / sigma_d, inp.t, inp.labels, inp.dropout_key))
    mse = (sigma_d * F - v_t).square().flatten(1).mean(1)  # (1/D)||sigma_d F - v_t||^2 (Eq. 4)
    w = w_of(model, params, inp.t, cfg)
    return ObjectiveOut(weighted(mse, w), mse.detach(), w.detach(), torch.zeros_like(mse))
