"""Objectives: pure functions `objective(model, params, inputs, cfg) -> ObjectiveOut`.

`diffusion` is TrigFlow diffusion (sCM Eq. 4, the teacher and baseline), `sct` continuous-time
consistency training (Algorithm 1) and `scd` its distillation of a frozen teacher; `weighting` is the
adaptive weighting they use (Eq. 8), `common` their inputs, output and masking of non-finite samples;
`discrete` is sCT with the tangent's network derivative over one grid step (sCM Fig. 5c), `ict` the
discrete-time consistency training of iCT on `ict_schedule`'s pieces (grid, curriculum, index
distribution, Pseudo-Huber, the EDM consistency function). All
randomness arrives in `StepInputs`, drawn by the caller outside any compiled region.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from scm_graph.objectives.common import ObjectiveOut, StepInputs

__all__ = ["ObjectiveOut", "Passes", "StepInputs", "get_objective", "get_passes"]


def get_objective(kind: str, teacher: nn.Module | None = None) -> Callable[..., ObjectiveOut]:
    """The objective `fn(model, params, inputs, cfg)`; 'scd' needs its frozen `teacher`."""
    from scm_graph.objectives.diffusion import diffusion_loss
    from scm_graph.objectives.discrete import discrete_loss
    from scm_graph.objectives.ict import ict_loss
    from scm_graph.objectives.scd import scd_loss
    from scm_graph.objectives.sct import sct_loss

    if kind == "scd":
        if teacher is None:
            raise ValueError("the 'scd' objective needs its teacher")
        return functools.partial(scd_loss, teacher=teacher)
    return {"sct": sct_loss, "diffusion": diffusion_loss, "discrete": discrete_loss, "ict": ict_loss}[kind]


@dataclass(frozen=True)
class Passes:
    """An objective cut in two for wrapped (DDP / FSDP) networks: `prepare(model, params, inputs, cfg)` is
    everything before the gradient pass (sCT / sCD: the JVP pass), run without gradient on plain weights;
    its result has `.inputs` and `.x_t`, the gradient pass's arguments. `finish(F, w, prep)` is the loss from
    the gradient pass's F_theta(x_t, t) and w_phi(t). `finish(F, w, prepare(...))` is the objective exactly."""

    prepare: Callable[..., Any]
    finish: Callable[..., ObjectiveOut]


def get_passes(kind: str, teacher: nn.Module | None = None) -> Passes:
    """The two passes of objective `kind` ('scd' needs its frozen `teacher`)."""
    from scm_graph.objectives.diffusion import diffusion_finish, diffusion_prepare
    from scm_graph.objectives.discrete import finite_difference_tangent
    from scm_graph.objectives.ict import ict_finish, ict_prepare
    from scm_graph.objectives.scd import scd_velocity
    from scm_graph.objectives.sct import consistency_finish, consistency_prepare, sct_velocity

    if kind == "diffusion":
        return Passes(diffusion_prepare, diffusion_finish)
    if kind == "ict":
        return Passes(ict_prepare, ict_finish)
    if kind == "discrete":
        return Passes(functools.partial(consistency_prepare, dxt_of=sct_velocity, tangent_fn=finite_difference_tangent),
                      consistency_finish)
    if kind == "scd":
        if teacher is None:
            raise ValueError("the 'scd' objective needs its teacher")
        velocity = functools.partial(scd_velocity, teacher)
    else:
        velocity = sct_velocity
    return Passes(functools.partial(consistency_prepare, dxt_of=velocity), consistency_finish)
