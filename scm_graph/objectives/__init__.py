"""Objectives: pure functions `objective(model, params, inputs, cfg) -> ObjectiveOut`.

`diffusion` is TrigFlow diffusion (sCM Eq. 4, the teacher and baseline) and `sct` continuous-time
consistency training (Algorithm 1); `weighting` is the adaptive weighting both use (Eq. 8), `common`
their inputs, output and masking of non-finite samples. All randomness arrives in `StepInputs`, drawn
by the caller outside any compiled region.
"""

from __future__ import annotations

from typing import Callable

from scm_graph.objectives.common import ObjectiveOut, StepInputs

__all__ = ["ObjectiveOut", "StepInputs", "get_objective"]


def get_objective(kind: str) -> Callable[..., ObjectiveOut]:
    from scm_graph.objectives.diffusion import diffusion_loss
    from scm_graph.objectives.sct import sct_loss

    return {"sct": sct_loss, "diffusion": diffusion_loss}[kind]
