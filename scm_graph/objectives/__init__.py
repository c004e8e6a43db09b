"""Objectives: pure functions `objective(model, params, inputs, cfg) -> ObjectiveOut`.

`diffusion` is TrigFlow diffusion (sCM Eq. 4, the teacher and baseline), `sct` continuous-time
consistency training (Algorithm 1) and `scd` its distillation of a frozen teacher; `weighting` is the
adaptive weighting they use (Eq. 8), `common` their inputs, output and masking of non-finite samples. All randomness arrives in `StepInputs`, drawn
by the caller outside any compiled region.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from scm_graph.objectives.common import ObjectiveOut, StepInputs

__all__ = ["ObjectiveOut", "StepInputs", "get_objective"]


def get_objective(kind: str, teacher: nn.Module | None = None) -> Callable[..., ObjectiveOut]:
    """The objective `fn(model, params, inputs, cfg)`; 'scd' needs its frozen `teacher`."""
    from scm_graph.objectives.diffusion import diffusion_loss
    from scm_graph.objectives.scd import scd_loss
    from scm_graph.objectives.sct import sct_loss

    if kind == "scd":
        if teacher is None:
            raise ValueError("the 'scd' objective needs its teacher")
        return functools.partial(scd_loss, teacher=teacher)
    return {"sct": sct_loss, "diffusion": diffusion_loss}[kind]
