"""Multi-process training on torchrun: the process group, the DDP / FSDP2 wrapper, and what crosses processes.

`python -m scm_graph.train` started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) joins a
process group (NCCL on CUDA, gloo on CPU); started plainly it is one process and none of this runs.
The network is wrapped by PyTorch's own engine: `DistributedDataParallel` (`train.parallel ddp`) or FSDP2's
`fully_shard` on every block of the network and then on the whole (`fsdp`). The JVP pass never goes
through either wrapper (`torch.func.jvp` cannot: pytorch#102197, #182641); it runs on `full_params`, the
plain full weights, while the gradient pass goes through the wrapper, which reduces the gradients once
(docs/distributed.md). Checkpoints are consolidated on rank 0 (`full_state`) and loaded back on any number
of processes (`load_full_state`).
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scm_graph.errors import UserError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job; `World()` is a plain single process (no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists and the network is wrapped

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def under_torchrun() -> bool:
    return all(k in os.environ for k in _ENV)


def join(device_name: str, timeout_s: float) -> tuple[World, torch.device]:
    """Join torchrun's process group (or stay a single process) and pick this process's device:
    'auto' / 'cuda' -> cuda:LOCAL_RANK when CUDA is there, else the CPU with gloo."""
    from scm_graph.device import pick_device

    if not under_torchrun():
        return World(), pick_device(device_name)
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = pick_device("cpu" if device_name == "auto" else device_name)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local, True), device


def leave(collect: bool = True) -> None:
    """Destroy the process group while the interpreter is whole. DDP and FSDP2 wrappers sit in reference cycles
    that hold the group; left to the interpreter's exit, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception"), so collect them first after a clean finish. Not after a
    failed collective (`collect=False`): a wrapper with work pending on a dead peer would wait for it."""
    if dist.is_initialized():
        if collect:
            gc.collect()
        dist.destroy_process_group()


def lost_contact(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process died or cannot be reached."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ("Connection closed by peer", "Connection reset", "gloo", "NCCL", "Timed out")))


def check_batch(batch: int, accum: int, world: World) -> int:
    """The per-process micro-batch; one line if the global batch does not split evenly."""
    if batch % (world.size * accum):
        raise UserError(f"train.batch {batch} does not divide into {world.size} process{'es' if world.size > 1 else ''} "
                        f"x train.accum {accum} micro-batches")
    return batch // (world.size * accum)


# ---------------------------------------------------------------------------------------------
# Wrapping


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: every entry of every ModuleList (U-Net levels, DiT blocks)."""
    return [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]


def wrap(model: nn.Module, kind: str, world: World, device: torch.device, all_used: bool = True) -> nn.Module:
    """The model under DDP, or sharded in place by FSDP2 (every block, then the root). `all_used=False`
    lets DDP skip parameters that get no gradient (w_phi with adaptive weighting off)."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # our buffers are constants: no broadcast before every forward (the newer name where torch has it)
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=not all_used, **{quiet: False},
                   gradient_as_bucket_view=True)  # the gradients live in the reduction buckets: no second copy
    if kind != "fsdp":
        raise UserError(f"train.parallel must be 'ddp' or 'fsdp', not {kind!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_sync(wrapped: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient reduction of a backward that is not the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def local(t: Tensor) -> Tensor:
    """A DTensor's full value (gathered from every process), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def full_params(module: nn.Module) -> dict[str, Tensor]:
    """Plain, detached, full (unsharded) weights and buffers of the unwrapped module: FSDP2 shards are
    gathered here, all at once, for the JVP pass (its memory cost: one full copy of the weights)."""
    out = {k: local(p).detach() for k, p in module.named_parameters()}
    out.update({k: local(b) for k, b in module.named_buffers()})
    return out


# ---------------------------------------------------------------------------------------------
# Reductions


def all_reduce(t: Tensor, op: str = "sum", world: World | None = None) -> Tensor:
    """t reduced over all processes (in place; a no-op for a single process)."""
    if world is not None and not world.launched:
        return t
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier(world: World) -> None:
    if world.launched:
        dist.barrier()


def same_everywhere(x: object, world: World) -> object:
    """Rank 0's value of a small Python object, on every process."""
    if not world.launched:
        return x
    box = [x]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Consolidated state


def _is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def full_weights(tensors: dict[str, Tensor], world: World, everywhere: bool = False) -> dict[str, Tensor] | None:
    """Full CPU copies of (possibly sharded) tensors on rank 0 (on every process with `everywhere`), None
    elsewhere; one tensor gathered at a time."""
    out: dict[str, Tensor] = {}
    keep = world.main or everywhere
    for k, v in tensors.items():
        full = local(v.detach())
        if keep:
            out[k] = full.to("cpu", copy=True)
        del full
    return out if keep else None


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """`optimizer.state_dict()` with full tensors, keyed by parameter index as one process writes it,
    on rank 0 (None elsewhere); collective for a sharded module."""
    if not _is_sharded(module):
        return optimizer.state_dict() if world.main else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    osd = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    names = [k for k, _ in module.named_parameters()]
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load an index-keyed full `optimizer.state_dict()` (as `full_optimizer_state` returns) on any world size."""
    if not _is_sharded(module):
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = [k for k, _ in module.named_parameters()]
    osd = {"state": {names[int(i)]: s for i, s in sd["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
    # not strict: a weight that never had a gradient (w_phi with adaptive weighting off) has no saved state, and
    # starts without one, as in one process
    set_optimizer_state_dict(module, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))


@torch.no_grad()
def copy_full(dst: dict[str, Tensor], src: dict[str, Tensor]) -> None:
    """Copy full tensors `src` into `dst` by name; a sharded (DTensor) destination keeps only its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k, d in dst.items():
        s = src[k].to(device=d.device, dtype=d.dtype)
        if isinstance(d, DTensor):  # every process holds the full tensor: cut out this process's shard
            d.copy_(distribute_tensor(s, d.device_mesh, d.placements, src_data_rank=None))
        else:
            d.copy_(s)


def shard(t: Tensor) -> Tensor:
    """This process's part of a DTensor (its local shard), any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def gather_objects(x: object, world: World) -> list | None:
    """Every process's `x`, in rank order, on rank 0 (None elsewhere)."""
    if not world.launched:
        return [x]
    out: list = [None] * world.size
    dist.all_gather_object(out, x)
    return out if world.main else None
