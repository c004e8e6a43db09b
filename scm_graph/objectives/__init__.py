"""Objectives: pure functions of (model, params, inputs, config) -> ObjectiveOut.

All randomness (x0, z, t, the dropout key) is drawn by the caller, outside any compiled region, and
arrives in `StepInputs`; the warmup ratio r arrives as a tensor so a changing value never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass
class StepInputs:
    x0: Tensor  # [B, C, H, W] data, std ~ sigma_d
    z: Tensor  # [B, C, H, W] noise ~ N(0, sigma_d^2 I)
    t: Tensor  # [B] times in (0, pi/2)
    labels: Tensor | None  # [B] int64 class labels, or None
    dropout_key: Tensor  # [] int64
    r: Tensor  # [] float32 tangent-warmup ratio in [0, 1]


@dataclass
class ObjectiveOut:
    loss: Tensor  # [] the scalar to minimise
    mse: Tensor  # [B] 1/D ||residual||^2 per sample (before adaptive weighting)
    w: Tensor  # [B] w_phi(t)
    tangent_norm: Tensor  # [B] ||g|| before normalisation (zeros for diffusion)

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.loss, self.mse, self.w, self.tangent_norm


def get_objective(kind: str) -> Callable[..., ObjectiveOut]:
    from scm_graph.objectives.diffusion import diffusion_loss
    from scm_graph.objectives.sct import sct_loss

    return {"sct": sct_loss, "diffusion": diffusion_loss}[kind]
