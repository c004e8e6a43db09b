"""What every objective shares: its inputs (`StepInputs`), its output (`ObjectiveOut`), and the masking
of non-finite samples.

All randomness (x0, z, t, the dropout key) is drawn by the caller, outside any compiled region, and
arrives in `StepInputs`; the warmup ratio r arrives as a tensor so a changing value never recompiles.

Samples whose tangent or prediction is not finite are masked, never trained on: their inputs are
zeroed before the gradient pass, their loss weight is 0, and `ObjectiveOut.nonfinite` reports them.
All of it is tensor arithmetic (no data-dependent Python branches), so it compiles with fullgraph=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepInputs:
    x0: Tensor  # [B, C, H, W] data, std ~ sigma_d
    z: Tensor  # [B, C, H, W] noise ~ N(0, sigma_d^2 I)
    t: Tensor  # [B] times in (0, pi/2)
    labels: Tensor | None  # [B] int64 class labels, or None
    dropout_key: Tensor  # [] int64
    r: Tensor  # [] float32 tangent-warmup ratio in [0, 1]
    guidance: Tensor | None = None  # [B] CFG scales s of guidance distillation (sCD), or None
    t_prev: Tensor | None = None  # [B] the earlier time of a discrete pair (iCT: t of sigma_i, with t of sigma_{i+1}), or None

    def forward_args(self, x_t: Tensor, t: Tensor | None = None) -> tuple:
        """The network's arguments (x_t, t, labels, dropout_key, guidance) at x_t (and t, else these times)."""
        return (x_t, self.t if t is None else t, self.labels, self.dropout_key, self.guidance)


@dataclass
class ObjectiveOut:
    loss: Tensor  # [] the scalar to minimise
    mse: Tensor  # [B] 1/D ||residual||^2 per sample (before adaptive weighting)
    w: Tensor  # [B] w_phi(t)
    tangent_norm: Tensor  # [B] ||g|| before normalisation (zeros for diffusion)
    nonfinite: Tensor  # [B] bool: samples masked out (non-finite tangent or prediction), loss weight 0

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The compiled train step returns this tuple; `ObjectiveOut(*t)` rebuilds the record."""
        return self.loss, self.mse, self.w, self.tangent_norm, self.nonfinite


def finite_samples(*xs: Tensor) -> Tensor:
    """[B] bool: True where every element of sample i is finite in all of `xs`."""
    ok = torch.isfinite(xs[0]).reshape(xs[0].shape[0], -1).all(1)
    for x in xs[1:]:
        ok = ok & torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    return ok


def zero_unless(ok: Tensor, x: Tensor) -> Tensor:
    """x with the samples where `ok` is False replaced by zeros (a select, so NaN/inf do not leak)."""
    return torch.where(ok.reshape(-1, *([1] * (x.ndim - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))
