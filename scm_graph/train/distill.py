"""The frozen teacher of an sCD run, loaded from `objective.teacher` and checked against the student's spec.

'trigflow': a diffusion checkpoint written by scm_graph; its network is rebuilt from the checkpoint's own
spec and carries its EMA weights. 'edm': an EDM-parameterised denoiser built by the user's factory
(`objective.teacher_factory`, see `scm_graph.teacher.load_denoiser`) with weights from `objective.teacher`,
wrapped into the TrigFlow interface by the exact conversion (`scm_graph.teacher.EDMVelocity`).

Either way the teacher is in eval mode (no dropout) with `requires_grad` off, is not a submodule of the
student (so it is in neither the optimiser, the EMA nor the student's checkpoint), and every mismatch
with the student (data shape, normalisation, sigma_d, classes, guidance without labels) is one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from scm_graph import trigflow
from scm_graph.checkpoint import load_checkpoint
from scm_graph.errors import UserError
from scm_graph.model import ZERO_INIT_EXTRAS, TrigFlowModel, build_model, copy_params
from scm_graph.objectives import StepInputs
from scm_graph.objectives.scd import teacher_velocity
from scm_graph.precision import autocast
from scm_graph.spec import Spec, distils_guidance, spec_from_json
from scm_graph.teacher import EDMVelocity, load_denoiser


@dataclass
class Teacher:
    module: nn.Module
    """The frozen teacher with the TrigFlow interface `module(x_t, t, labels) -> F` and `module.sigma_d`."""
    ema: dict[str, torch.Tensor] | None
    """A 'trigflow' teacher's EMA weights (the sCD student's initialisation), None for an 'edm' teacher."""


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_teacher(spec: Spec, device: torch.device, verify: bool = True) -> Teacher:
    """The teacher of the sCD run `spec`, on `device`, checked against the student's spec."""
    o = spec.objective
    if o.teacher_kind == "edm":
        denoiser = load_denoiser(o.teacher_factory, o.teacher)
        return Teacher(_frozen(EDMVelocity(denoiser, o.sigma_d), device), None)
    ckpt = load_checkpoint(o.teacher, verify=verify)
    t_spec = spec_from_json(ckpt.spec_json)
    check_teacher(t_spec, spec, o.teacher)
    with torch.random.fork_rng(devices=[]):  # building the teacher must not move the student's RNG
        model: TrigFlowModel = build_model(t_spec)
    weights = ckpt.ema if ckpt.ema is not None else ckpt.net
    try:
        copy_params(model, weights)
    except ValueError as e:
        raise UserError(f"objective.teacher {o.teacher}: {e}") from None
    return Teacher(_frozen(model, device), weights)


def check_teacher(t: Spec, s: Spec, path: str) -> None:
    """One line for each way a 'trigflow' teacher cannot teach this student."""
    where = f"objective.teacher {path}"
    if t.objective.kind != "diffusion":
        raise UserError(f"{where} is a {t.objective.kind!r} model; sCD distils a diffusion teacher")
    td, sd = t.data, s.data
    if (td.channels, td.resolution) != (sd.channels, sd.resolution):
        raise UserError(f"{where} models {td.channels}x{td.resolution}x{td.resolution} data, "
                        f"the student's shards hold {sd.channels}x{sd.resolution}x{sd.resolution}")
    if (td.normalize, td.mean, td.std) != (sd.normalize, sd.mean, sd.std):
        raise UserError(f"{where} was trained on data normalised differently ({td.normalize}, mean {td.mean}); "
                        f"train the student on the teacher's shard set")
    if t.objective.sigma_d != s.objective.sigma_d:
        raise UserError(f"{where} has sigma_d {t.objective.sigma_d}, the student {s.objective.sigma_d}: they must agree")
    if s.objective.init_from_teacher and t.net.time_scale != s.net.time_scale:  # its weights, another c_noise(t) = s t
        raise UserError(f"{where} has net.time_scale {t.net.time_scale:g}, the student {s.net.time_scale:g}: a student "
                        "that starts from the teacher's weights needs the teacher's (or --objective.init_from_teacher false)")
    if s.net.class_conditional:
        if not t.net.class_conditional:
            raise UserError(f"{where} is unconditional; a class-conditional student (guidance distillation) needs a "
                            "class-conditional teacher")
        if td.num_classes != sd.num_classes:
            raise UserError(f"{where} has {td.num_classes} classes, the student's shards {sd.num_classes}")
        if distils_guidance(s) and s.objective.guidance[1] != 1.0 and t.objective.label_dropout == 0:
            raise UserError(f"{where} was trained without label dropout, so it has no unconditional velocity for "
                            "guidance; set objective.guidance 1 1 or use a teacher trained with label dropout")


def init_student(model: nn.Module, teacher: Teacher, spec: Spec) -> None:
    """The student starts as the teacher: its EMA weights, the guidance input zero (sCM Sec. 6)."""
    if teacher.ema is None:  # validate refuses this combination before any work
        raise UserError("objective.init_from_teacher needs a 'trigflow' teacher; pass --objective.init_from_teacher false")
    try:
        copy_params(model, teacher.ema, allow_missing=ZERO_INIT_EXTRAS)
    except ValueError as e:
        raise UserError(f"objective.teacher {spec.objective.teacher}: the student's network differs from the teacher's "
                        f"({e}); use the teacher's net settings or --objective.init_from_teacher false") from None


def teacher_seconds(teacher: nn.Module, inp: StepInputs, precision: str) -> float:
    """Wall time of the teacher's part of one sCD step (its guided velocity on this batch), measured eagerly
    under the step's autocast: beside the step time it gives the teacher's share of the step (an estimate,
    since the compiled step fuses the teacher's passes with the rest)."""
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    dev = x_t.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with autocast(dev.type, precision):
        teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
