"""The train step: objective forward (with its JVP) compiled by torch.compile, then backward and update.

`torch.compile` traces the objective (jvp + loss); AOTAutograd compiles its backward graph too, so the
whole forward-JVP-backward runs compiled. `compile=False` runs exactly the same Python eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scm_graph.objectives import StepInputs, get_objective
from scm_graph.spec import OptimSpec, Spec


@dataclass
class StepOut:
    loss: Tensor  # []
    mse: Tensor  # [B]
    w: Tensor  # [B]
    tangent_norm: Tensor  # [B]
    grad_norm: Tensor  # []


def make_optimizer(params: list[nn.Parameter], cfg: OptimSpec) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.kind]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


class TrainStep:
    def __init__(self, model: nn.Module, spec: Spec, compile: bool | None = None):
        self.model = model
        self.params = dict(model.named_parameters())
        self.grad_clip = spec.optim.grad_clip
        self.optimizer = make_optimizer(list(self.params.values()), spec.optim)
        objective, cfg = get_objective(spec.objective.kind), spec.objective

        def loss_fn(params, x0, z, t, labels, dropout_key, r):
            return objective(model, params, StepInputs(x0, z, t, labels, dropout_key, r), cfg).as_tuple()

        compile = spec.train.compile if compile is None else compile
        self.loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False) if compile else loss_fn

    def __call__(self, inp: StepInputs) -> StepOut:
        loss, mse, w, tangent_norm = self.loss_fn(self.params, inp.x0, inp.z, inp.t, inp.labels, inp.dropout_key, inp.r)
        loss.backward()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOut(loss.detach(), mse, w, tangent_norm, grad_norm.detach())
