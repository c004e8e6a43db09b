"""The train step: objective forward (with its JVP) compiled by torch.compile, then backward and update.

A step takes this process's share of the global batch and runs it as `train.accum` micro-batches,
accumulating gradients (each micro-batch's loss is divided by accum; the objectives average over the
batch with masked samples counted as zeros, so any split gives the whole batch's gradient).
Under torchrun (`Wrapped`) the objective is cut in two (`scm_graph.objectives.Passes`): the no-gradient
JVP pass on the plain full weights, then the gradient pass through the DDP / FSDP2 wrapper, which
reduces the gradients once per step; the skip decision is agreed by all processes.

`torch.compile` traces the objective (jvp + loss) inside its autocast region (`TrainSpec.precision`),
so Dynamo sees the casts; AOTAutograd compiles its backward graph too, so the whole
forward-JVP-backward runs compiled, with `scm_graph.ops.zero_tangents`' pass dropping the products with
zero weight tangents that forward-mode AD leaves in the graph. `compile=False` runs exactly the same Python eagerly.
Single-process sCT / sCD on an accelerator take the gradient through the JVP's own primal output (one JVP and one
backward per step; `objective.fused_pass`); on the CPU and under torchrun the two passes stay separate (on the CPU
they are faster; under torchrun the gradient pass must go through the wrapper).

Non-finite values never reach the weights: the objective masks samples with a non-finite tangent
(`ObjectiveOut.nonfinite`), and a step whose loss or gradient norm is still not finite, or whose
every sample was masked, skips the optimiser update (fp16: the GradScaler also backs off its scale). On an
accelerator that decision stays on the device (`scm_graph.train.update`), so a step needs no host sync; its
report (`StepOut`) stays there too, for the loop to read every few steps.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from scm_graph.objectives import ObjectiveOut, StepInputs, get_objective, get_passes
from scm_graph.ops.zero_tangents import COMPILE_OPTIONS
from scm_graph.precision import amp_dtype, autocast, make_scaler
from scm_graph.spec import OptimSpec, Spec
from scm_graph.train import inductor_warmup, parallel
from scm_graph.train.parallel import World
from scm_graph.train.update import GuardedUpdate, make_optimizer

# Inductor stores a pointwise value read by several kernels only when its expression has more than this many ops
# (`realize_cpu_opcount_threshold`, CPU kernels only, default 50); below that it inlines the expression into every
# reader, and the sCT step's values have many (the JVP's primal and tangent, the gradient pass, the backward). At 24:
# digits_sct's first compiled step 111 s -> 83-87 s on 2 cores, the diffusion step's 70 s -> 43 s, step times unchanged
# (docs/bench_step_cpu.md, "Cold start"). In fp32 a stored value is the one the inlined expression computes (the
# compiled-vs-eager step tests pass unchanged); in bf16 a stored value is rounded to bf16 where an inlined one may not.
CPU_REALIZE_OPCOUNT = 24


# Triton before 3.8 fails to compile one of Inductor's 2D-tiled pointwise kernels for sm_90: the compiled DiT step's
# time-embedding kernel (cos/sin of t x frequencies beside its tangent) stops in TritonGPURemoveLayoutConversions
# ("operand does not dominate this use", then `PassManager::run failed` in make_ttgir). Seen on an H100 with torch
# 2.11 / Triton 3.6. Lowering the kernel's source for sm_90 on the CPU: Triton 3.6 and 3.7.1 fail at 97 of 284
# (block shape, warps) configurations, 3.8.0 at none, and its 1D form lowers with 3.6. With an older Triton the GPU
# step therefore uses 1D kernels only (Inductor's `triton.max_tiles` = 1; docs/bench_step_h100.md).
TRITON_2D_TILES_FROM = (3, 8)


def _triton_release() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton; None without one."""
    try:
        import triton
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpu_kernel_options(device_type: str, triton_release: tuple[int, int] | None = None) -> dict:
    """Inductor options for the GPU kernels of every compiled function of the step: 1D kernels with a Triton before 3.8."""
    if device_type != "cuda":
        return {}
    release = _triton_release() if triton_release is None else triton_release
    return {"triton.max_tiles": 1} if release is not None and release < TRITON_2D_TILES_FROM else {}


def step_compile_options(device_type: str, inductor_config: object | None = None,
                         triton_release: tuple[int, int] | None = None) -> dict:
    """The options of the train step's compiled functions on `device_type`: the zero-tangent pass; on the CPU, the wait for
    the vector-ISA check the step started (`inductor_warmup`); the CPU threshold above
    where the installed Inductor has it (torch.compile rejects an option its Inductor does not know; torch 2.11 has only
    an all-devices threshold, default 30, and 24 there gave no faster first step: 108.2 s against 107.3 s, digits_sct on
    2 cores); and 1D GPU kernels with a Triton before 3.8."""
    if inductor_config is None:
        import torch._inductor.config as inductor_config
    options = dict(COMPILE_OPTIONS)
    if device_type == "cpu":
        options.update(inductor_warmup.COMPILE_OPTIONS)  # waits for the step's vector-ISA check before code generation
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):  # torch 2.13 on: CPU kernels only
        options["realize_cpu_opcount_threshold"] = CPU_REALIZE_OPCOUNT
    return {**options, **gpu_kernel_options(device_type, triton_release)}


@dataclass
class StepOut:
    """What one step reports, left on the device (reading a field on the host syncs; the loop does so every few steps)."""

    loss: Tensor  # []
    mse: Tensor  # [B]
    w: Tensor  # [B]
    tangent_norm: Tensor  # [B]
    grad_norm: Tensor  # []
    nonfinite: Tensor  # [B] bool: samples masked out by the objective (loss weight 0)
    n_nonfinite: Tensor | int  # [] their count over the global batch (all processes)
    skipped: Tensor | bool  # [] bool: the optimiser update was skipped (non-finite loss / gradient, or every sample masked)
    loss_scale_overflow: Tensor | bool = False  # [] bool, fp16: the skip was the loss scaler backing off (expected now and then)
    n_samples: int = 0  # the global batch size (all processes)


def learning_rate(cfg: OptimSpec, images: int) -> float:
    """The learning rate of the step that starts after `images` images (EDM2's schedule, Karras et al. 2024, Eq. 16)."""
    lr = cfg.lr
    if cfg.lr_decay_images > 0:
        lr /= math.sqrt(max(images / cfg.lr_decay_images, 1.0))  # alpha_ref / sqrt(max(t / t_ref, 1))
    if cfg.lr_rampup_images > 0:
        lr *= min(images / cfg.lr_rampup_images, 1.0)  # linear warmup from 0
    return lr


@dataclass
class Wrapped:
    """A network under torchrun: the wrapper the gradient pass goes through, and the plain module the JVP pass
    runs on with the full weights (`parallel.full_params`): DDP's own module, or for FSDP2 a twin on the meta
    device (structure only; its weights and buffers always come in through functional_call)."""

    module: nn.Module
    plain: nn.Module
    world: World


def micro_batches(inp: StepInputs, accum: int, first: int) -> list[StepInputs]:
    """`inp` cut into `accum` equal micro-batches; each one's dropout key carries the index of its first sample
    in the global batch (`first` is that of `inp`), so dropout masks do not depend on the split."""
    if accum == 1 and first == 0:
        return [inp]
    b = inp.x0.shape[0] // accum
    out = []
    for m in range(accum):
        part = {f.name: getattr(inp, f.name) for f in fields(inp)}
        for k, v in part.items():
            if k not in ("dropout_key", "r") and v is not None:
                part[k] = v[m * b:(m + 1) * b]
        key = inp.dropout_key.reshape(-1)[0]
        part["dropout_key"] = torch.stack([key, torch.full_like(key, first + m * b)])  # [key, i0]
        out.append(StepInputs(**part))
    return out


class TrainStep:
    def __init__(self, model: nn.Module, spec: Spec, compile: bool | None = None, teacher: nn.Module | None = None,
                 wrapped: Wrapped | None = None, device_skip: bool | None = None):
        """`device_skip`: decide the update on the device, with no host sync (default: off the CPU)."""
        self.model = model
        self.params = dict(model.named_parameters())
        self.grad_clip = spec.optim.grad_clip
        self.accum = spec.train.accum
        self.wrapped = wrapped
        self.world = wrapped.world if wrapped else World()
        self.optim_cfg = spec.optim
        device_type = next(iter(self.params.values())).device.type
        self.device_skip = device_type != "cpu" if device_skip is None else device_skip
        self.optimizer = make_optimizer(list(self.params.values()), spec.optim, self.device_skip)
        self.update = GuardedUpdate(self.optimizer)  # call update.settle() before reading the optimiser's state
        self.renormalize = getattr(getattr(model, "net", None), "renormalize_", None)  # EDM2's forced weight normalisation
        objective, cfg = get_objective(spec.objective.kind, teacher), spec.objective  # sCD: the frozen teacher
        self.precision = spec.train.precision
        amp_dtype(self.precision)  # one-line error for an unknown precision, before any compilation
        self.device_type = device_type
        self.scaler = make_scaler(device_type, self.precision)  # fp16 only; a no-op otherwise
        precision = self.precision
        compile = spec.train.compile if compile is None else compile

        def loss_fn(params, x0, z, t, labels, dropout_key, r, guidance, t_prev):
            with autocast(device_type, precision):  # inside the compiled function, so Dynamo traces the casts
                return objective(model, params, StepInputs(x0, z, t, labels, dropout_key, r, guidance, t_prev), cfg).as_tuple()

        if compile and device_type == "cpu":
            inductor_warmup.start_vec_isa_check()  # runs while Dynamo and AOTAutograd trace the first call (empty cache: -4 s)
        options = step_compile_options(device_type) if compile else {}
        self.loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False, options=options) if compile else loss_fn
        if wrapped is not None:
            passes, plain = get_passes(spec.objective.kind, teacher), wrapped.plain
            self.finish = passes.finish
            self.adaptive = cfg.adaptive_weighting

            def prepare_fn(params, x0, z, t, labels, dropout_key, r, guidance, t_prev):
                with torch.no_grad(), autocast(device_type, precision):
                    return passes.prepare(plain, params, StepInputs(x0, z, t, labels, dropout_key, r, guidance, t_prev), cfg)

            self.prepare_fn = torch.compile(prepare_fn, fullgraph=True, dynamic=False, options=options) if compile else prepare_fn
            self.forward_fn = torch.compile(wrapped.module, options=gpu_kernel_options(device_type)) if compile else wrapped.module

    def _micro(self, inp: StepInputs) -> ObjectiveOut:
        """The loss of one micro-batch, its gradient pass still to run backward."""
        if self.wrapped is None:
            return ObjectiveOut(*self.loss_fn(self.params, inp.x0, inp.z, inp.t, inp.labels, inp.dropout_key, inp.r, inp.guidance,
                                              inp.t_prev))
        full = parallel.full_params(self.model)  # DDP: the weights themselves; FSDP2: gathered (one full copy)
        prep = self.prepare_fn(full, inp.x0, inp.z, inp.t, inp.labels, inp.dropout_key, inp.r, inp.guidance, inp.t_prev)
        del full
        with autocast(self.device_type, self.precision):
            out = self.forward_fn(*prep.inputs.forward_args(prep.x_t), weight=self.adaptive)
            F, w = out if self.adaptive else (out, torch.zeros_like(prep.inputs.t))
            return self.finish(F, w, prep)

    def __call__(self, inp: StepInputs, first: int = 0, images: int = 0) -> StepOut:
        """One optimiser step on `inp`, this process's share of the global batch, whose first sample is sample
        `first` of the global batch; `images` (seen before this step) sets the learning rate's schedule."""
        params = list(self.params.values())
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.optim_cfg, images)
        outs = []
        parts = micro_batches(inp, self.accum, first)
        for m, part in enumerate(parts):
            last = m == len(parts) - 1
            sync = parallel.no_sync(self.wrapped.module, last) if self.wrapped else nullcontext()
            with sync:
                out = self._micro(part)
                loss = out.loss / self.accum if self.accum > 1 else out.loss
                self.scaler.scale(loss).backward()  # scale(): identity unless fp16
            outs.append(out)
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping and the norm (no-op unless fp16)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = parallel.local(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        out = ObjectiveOut(torch.stack([o.loss.detach() for o in outs]).mean(), *(torch.cat([getattr(o, k) for o in outs])
                           for k in ("mse", "w", "tangent_norm", "nonfinite")))
        # how many samples were masked, and whether loss and gradient norm are finite: agreed by every process
        flags = torch.stack([out.nonfinite.sum(), (~torch.isfinite(out.loss)).long(), (~torch.isfinite(grad_norm)).long()])
        n_bad, loss_bad, grad_bad = parallel.all_reduce(flags, "sum", self.world).unbind()
        n = out.nonfinite.numel() * self.world.size  # every process holds an equal share of the global batch
        some_ok = n_bad < n  # an all-masked batch carries no signal: no update
        apply = (loss_bad == 0) & (grad_bad == 0) & some_ok
        if self.device_skip:  # no host sync: the update runs either way, guarded by the flag on the device
            self.update(apply)
        elif apply:  # the CPU: read the flag
            self.scaler.step(self.optimizer)  # = optimizer.step() unless fp16 (whose own inf check agrees here)
        if self.renormalize is not None and self.device_skip:
            self.renormalize(apply)  # weights back onto their spheres (EDM2 Eq. 66) where the update was applied
        elif self.renormalize is not None and apply:
            self.renormalize()
        if self.scaler.is_enabled():
            self.scaler.update()  # fp16: backs the scale off after an overflow, grows it after clean steps
        self.optimizer.zero_grad(set_to_none=True)
        overflow = (loss_bad == 0) & (grad_bad > 0) & some_ok & self.scaler.is_enabled()
        return StepOut(out.loss, out.mse, out.w, out.tangent_norm, grad_norm.detach(), out.nonfinite, n_bad, ~apply, overflow, n)
