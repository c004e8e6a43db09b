"""The optimiser, and its update applied or skipped by a flag that stays on the device.

A step whose loss or gradient is not finite must leave the weights alone. Reading that flag on the host
before the update costs a host sync per step, which drains an accelerator's queue, so there the update is
conditioned on the device instead (`GuardedUpdate`):
- PyTorch's fused Adam skips it itself (`found_inf`: weights, moments and step count stay as they were);
- other optimisers (RAdam) update, and the weights and moments saved before the update are put back where
  the flag says skip: one concatenation per device and dtype before and after, one `where`, one foreach copy.
  Their step counts live on the host (PyTorch's fast path; its `capturable` RAdam, with counts on the device,
  cost about 40 ms of CPU time per step on the digits U-Net, eager, H100): the flag is copied to the host
  without waiting, and the next update (or `settle`, before the state is read) takes a skipped step's count
  back. The copy is long done by then, so nothing waits for the queue to drain.
On the CPU, where there is no queue to drain, the train step reads the flag and calls `optimizer.step()` or not.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from scm_graph.spec import OptimSpec

EXECUTION_FLAGS = ("foreach", "fused", "capturable", "differentiable")  # how an update runs, not what it computes


def make_optimizer(params: list[nn.Parameter], cfg: OptimSpec, device_skip: bool) -> torch.optim.Optimizer:
    """`cfg`'s optimiser; `device_skip`: fused Adam, which skips an update by a device flag itself."""
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.kind == "adam":
        return torch.optim.Adam(params, fused=True if device_skip else None, **kw)
    return torch.optim.RAdam(params, **kw)


def portable_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved optimiser state with this optimiser's execution flags (a checkpoint written on a GPU with fused Adam
    resumes on the CPU and the other way round; the numbers are the same)."""
    groups = [{**g, **{k: mine[k] for k in EXECUTION_FLAGS if k in mine}}
              for g, mine in zip(state["param_groups"], optimizer.param_groups)]
    return {**state, "param_groups": groups}


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours `optimizer.found_inf` (PyTorch's fused Adam / AdamW / SGD)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


class GuardedUpdate:
    """`update(apply)`: `optimizer.step()` where the bool [] tensor `apply` is set, otherwise weights and optimiser
    state as they were, with no host sync. Call `settle()` before reading the optimiser's state (a checkpoint).

    `lag_counters`: fix host-side step counts after the fact (default: where `apply` is not on the CPU)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lag_counters: bool | None = None):
        self.optimizer = optimizer
        self.lag_counters = lag_counters
        self._pending: tuple[Tensor, torch.cuda.Event | None, list[Tensor]] | None = None

    def __call__(self, apply: Tensor) -> None:
        self.settle()
        opt = self.optimizer
        if takes_found_inf(opt):
            opt.found_inf, opt.grad_scale = (~apply).float(), None  # the fused kernel's own skip
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
            return
        lag = apply.device.type != "cpu" if self.lag_counters is None else self.lag_counters
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        before = _tensors(opt, params, lag)
        saved = {key: torch.cat([t.reshape(-1) for t in ts]) for key, ts in _by_kind(list(before.values())).items()}
        opt.step()
        after = _tensors(opt, params, lag)
        if not before.keys() <= after.keys():
            raise RuntimeError("the optimiser replaced its state tensors during the update; GuardedUpdate cannot guard it")
        # the same order as `before`, then the state the update created (Adam / RAdam start it at zero)
        order = [t for k, t in after.items() if k in before] + [t for k, t in after.items() if k not in before]
        for key, ts in _by_kind(order).items():
            new = torch.cat([t.reshape(-1) for t in ts])
            old = saved.pop(key, new.new_zeros(0))
            if old.numel() < new.numel():  # what the update created was zero before it
                old = torch.cat([old, old.new_zeros(new.numel() - old.numel())])
            torch.where(apply.to(new.device), new, old, out=new)
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(new.split([t.numel() for t in ts]), ts)])
            del new, old
        if lag:
            counters = [opt.state[p]["step"] for p in params if torch.is_tensor(opt.state[p].get("step"))]
            self._pending = (*_to_host(apply), counters)

    def settle(self) -> None:
        """Take back the step counts of the last update if it was skipped (waits for that step's flag only)."""
        if self._pending is None:
            return
        flag, event, counters = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if not bool(flag):
            for c in counters:
                c.sub_(1)


def _to_host(flag: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """`flag` on its way to the host, and the event that says it has arrived (None: there already)."""
    if flag.device.type != "cuda":
        return flag.to("cpu"), None
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    with torch.cuda.device(flag.device):  # the flag's GPU, which need not be the current one (--train.device cuda:1)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return host, event


def _tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], lag: bool) -> dict[int, Tensor]:
    """The parameters, then each one's state tensors (moments; step counts unless `lag`), in a fixed order, by the
    id of the object that holds them."""
    out = {id(p): _local(p.detach()) for p in params}
    out.update({id(v): _local(v) for p in params for k, v in sorted(optimizer.state.get(p, {}).items())
                if torch.is_tensor(v) and not (lag and k == "step")})
    return out


def _local(t: Tensor) -> Tensor:
    """A DTensor's own shard (FSDP2: each process guards what it holds), which shares its storage; else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _by_kind(ts: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    out: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in ts:
        out[(t.device, t.dtype)].append(t)
    return out
