"""The train step: objective forward (with its JVP) compiled by torch.compile, then backward and update.

`torch.compile` traces the objective (jvp + loss) inside its autocast region (`TrainSpec.precision`),
so Dynamo sees the casts; AOTAutograd compiles its backward graph too, so the whole
forward-JVP-backward runs compiled. `compile=False` runs exactly the same Python eagerly.

Non-finite values never reach the weights: the objective masks samples with a non-finite tangent
(`ObjectiveOut.nonfinite`), and a step whose loss or gradient norm is still not finite, or whose
every sample was masked, skips the optimiser update (fp16: the GradScaler also backs off its scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scm_graph.objectives import ObjectiveOut, StepInputs, get_objective
from scm_graph.precision import amp_dtype, autocast, make_scaler
from scm_graph.spec import OptimSpec, Spec


@dataclass
class StepOut:
    loss: Tensor  # []
    mse: Tensor  # [B]
    w: Tensor  # [B]
    tangent_norm: Tensor  # [B]
    grad_norm: Tensor  # []
    nonfinite: Tensor  # [B] bool: samples masked out by the objective (loss weight 0)
    n_nonfinite: int  # their count
    skipped: bool  # the optimiser update was skipped (non-finite loss / gradient, or every sample masked)
    loss_scale_overflow: bool = False  # fp16: the skip was the loss scaler backing off (expected now and then)


def make_optimizer(params: list[nn.Parameter], cfg: OptimSpec) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.kind]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


class TrainStep:
    def __init__(self, model: nn.Module, spec: Spec, compile: bool | None = None, teacher: nn.Module | None = None):
        self.model = model
        self.params = dict(model.named_parameters())
        self.grad_clip = spec.optim.grad_clip
        self.optimizer = make_optimizer(list(self.params.values()), spec.optim)
        objective, cfg = get_objective(spec.objective.kind, teacher), spec.objective  # sCD: the frozen teacher
        self.precision = spec.train.precision
        amp_dtype(self.precision)  # one-line error for an unknown precision, before any compilation
        device_type = next(iter(self.params.values())).device.type
        self.scaler = make_scaler(device_type, self.precision)  # fp16 only; a no-op otherwise
        precision = self.precision

        def loss_fn(params, x0, z, t, labels, dropout_key, r, guidance):
            with autocast(device_type, precision):  # inside the compiled function, so Dynamo traces the casts
                return objective(model, params, StepInputs(x0, z, t, labels, dropout_key, r, guidance), cfg).as_tuple()

        compile = spec.train.compile if compile is None else compile
        self.loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False) if compile else loss_fn

    def __call__(self, inp: StepInputs) -> StepOut:
        out = ObjectiveOut(*self.loss_fn(self.params, inp.x0, inp.z, inp.t, inp.labels, inp.dropout_key, inp.r, inp.guidance))
        params = list(self.params.values())
        self.scaler.scale(out.loss).backward()  # scale(): identity unless fp16
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping and the norm (no-op unless fp16)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        # one host sync: how many samples were masked, and whether loss and gradient norm are finite
        flags = torch.stack([out.nonfinite.sum(), torch.isfinite(out.loss).long(), torch.isfinite(grad_norm).long()])
        n_bad, loss_ok, grad_ok = flags.tolist()
        some_ok = n_bad < out.nonfinite.numel()  # an all-masked batch carries no signal: no update
        apply = bool(loss_ok and grad_ok) and some_ok
        if apply:
            self.scaler.step(self.optimizer)  # = optimizer.step() unless fp16 (whose own inf check agrees here)
        if self.scaler.is_enabled():
            self.scaler.update()  # fp16: backs the scale off after an overflow, grows it after clean steps
        self.optimizer.zero_grad(set_to_none=True)
        overflow = self.scaler.is_enabled() and bool(loss_ok) and not grad_ok and some_ok
        return StepOut(out.loss.detach(), out.mse, out.w, out.tangent_norm, grad_norm.detach(), out.nonfinite,
                       int(n_bad), not apply, overflow)
