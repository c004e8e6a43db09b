"""Adaptive loss weighting (sCM Eq. 8, after EDM2): e^{w_phi(t)} * loss - w_phi(t), w_phi learned jointly."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


def weighted(mse: Tensor, w: Tensor, ok: Tensor | None = None) -> Tensor:
    """Adaptive weighting: e^{w_phi(t)} * (1/D)||.||^2 - w_phi(t), averaged over the batch (Eq. 8).

    With `ok` ([B] bool) the masked samples count as zeros: the mean still divides by B, so a batch split
    over processes or micro-batches averages to exactly the whole batch's loss (and gradient).
    """
    per_sample = torch.exp(w) * mse - w  # Eq. 8
    if ok is None:
        return per_sample.mean()
    return torch.where(ok, per_sample, 0.0).mean()


def w_of(model: nn.Module, params: dict[str, Tensor], t: Tensor, cfg: ObjectiveSpec) -> Tensor:
    """w_phi(t) from the `w_phi.` entries of `params`, always in float32 (a time-embedding path); 0 when off."""
    if not cfg.adaptive_weighting:
        return torch.zeros_like(t)
    with fp32_region(t):
        return functional_call(model.w_phi, {k[6:]: v for k, v in params.items() if k.startswith("w_phi.")}, (t,))
