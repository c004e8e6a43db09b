"""sCD: continuous-time consistency distillation, Algorithm 1 of sCM (Lu & Song 2025) with a teacher's velocity.

Everything is sCT's (`scm_graph.objectives.sct.consistency_loss`: theta^- the stop-gradient of the current
weights, the JVP rearrangement, tangent normalisation, adaptive weighting) except dx_t/dt, which is the
frozen diffusion teacher's PF-ODE velocity at the same point instead of the one-sample estimate:

    dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t)                                    (unconditional)
    dx_t/dt = sigma_d (F_u + s (F_c - F_u)),  F_c / F_u with the label / the null class  (guided, Sec. 6)

With classifier-free guidance the student also takes the scale s as an input (s ~ U[s_min, s_max] per
sample, drawn by the caller), and both teacher passes run as one batched call. The teacher is any
module with the TrigFlow interface `teacher(x_t, t, labels)` and the same sigma_d: our diffusion
checkpoint, or an EDM denoiser wrapped by `scm_graph.teacher.EDMVelocity`. It gets no gradient, no
dropout key, and is not part of `params`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from scm_graph import trigflow
from scm_graph.objectives.common import ObjectiveOut, StepInputs
from scm_graph.objectives.sct import consistency_loss
from scm_graph.spec import ObjectiveSpec


def teacher_velocity(teacher: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None) -> Tensor:
    """dx_t/dt of the teacher's (guided) PF-ODE at x_t, in x_t's dtype; no gradient."""
    with torch.no_grad():
        if labels is None or guidance is None:
            F = teacher(x_t, t, labels)
        else:
            F_c, F_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)])).chunk(2)
            F = F_u + trigflow.expand(guidance, F_c).to(F_c.dtype) * (F_c - F_u)  # CFG: F_u + s (F_c - F_u)
        return (teacher.sigma_d * F).to(x_t.dtype)  # dx_t/dt = sigma_d F_teacher (Eq. 3)


def scd_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec, teacher: nn.Module) -> ObjectiveOut:
    """sCD: Algorithm 1 with the teacher's velocity in the tangent."""
    return consistency_loss(model, params, inp, cfg, functools.partial(scd_velocity, teacher))


def scd_velocity(teacher: nn.Module, x_t: Tensor, inp: StepInputs) -> Tensor:
    """sCD's dx_t/dt: the teacher's (guided) velocity at x_t."""
    return teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)
