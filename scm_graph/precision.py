"""Mixed precision of the train step: the autocast region, its float32 islands, and the fp16 loss scaler.

`TrainSpec.precision` picks the autocast dtype of the objective (network forward, JVP and backward);
parameters and optimiser state stay float32. t, the time embedding and the tangent arithmetic stay in
float32 (docs/design.md, "Mixed precision"): the networks' embeddings and modulations and the
objectives' g, ||g||, loss and w_phi(t) run inside `fp32_region`. fp16 adds a dynamic loss scaler
(`torch.amp.GradScaler`); bf16 needs none.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from scm_graph.errors import UserError

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of `precision` (None for fp32); one-line UserError for an unknown name."""
    if precision not in AMP_DTYPES:
        raise UserError(f"train.precision must be one of {', '.join(AMP_DTYPES)}, got {precision!r}")
    return AMP_DTYPES[precision]


def fp32_region(x: torch.Tensor) -> AbstractContextManager:
    """Autocast off around a float32 island (time embedding, modulation, tangent arithmetic, loss).

    Without autocast this is no context at all, so the fp32 graph has no autocast boundaries in it.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def autocast(device_type: str, precision: str) -> AbstractContextManager:
    """The train step's autocast region (nothing at all for fp32, so the fp32 graph is unchanged)."""
    dtype = amp_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def make_scaler(device_type: str, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (init 2^16, x0.5 on overflow, x2 after 2000 clean steps); disabled otherwise."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
