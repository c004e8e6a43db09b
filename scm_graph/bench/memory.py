"""`python -m scm_graph.bench memory --spec specs/X.py --ranks 1 8 [--batch 32] [--precision fp32 bf16] [--field.sub value ...]`
(or `just bench memory ...`).

Per-rank memory of training a spec's network with N processes, computed without allocating it: nothing
runs on a GPU and no tensor memory is touched, so a 1 B-parameter network is sized on a laptop.

- Weights, gradients, optimiser state (Adam / RAdam: two float32 moments per weight) and the EMA copy,
  in closed form from the parameter count of the network built on the meta device: replicated on every
  rank under DDP, sharded 1/N under FSDP2 `fully_shard` (dim 0 of every weight, padded to a multiple of N,
  as FSDP2 does; the numbers are those of rank 0, the largest shard). `train/parallel.wrap` builds DDP with
  `gradient_as_bucket_view=True`: the gradients are views into DDP's flat reduction buckets, so the
  buckets *are* the gradients' storage and add no second copy (DDP's default would add one).
- Activations: the sCT step is *run* on meta-backed fake tensors (`FakeTensorMode`: each tensor is a meta
  tensor tagged as a CPU tensor, so autocast and the fused SDPA kernels apply as on a real device, and
  no memory is allocated) at the per-rank micro-batch, in the two passes of the distributed step
  (`train/step.py`, cut by `objectives.get_passes`): the no-gradient JVP pass `prepare` on the plain
  weights, then the gradient pass (the network's forward with w_phi(t), `finish`, backward).
  `saved_tensors_hooks` sum what autograd saves for backward in the gradient pass (deduplicated by
  storage); a `TorchDispatchMode` tracks the bytes of every live tensor (weakref finalizers tell when a
  storage dies) and reports the peak of the JVP pass, of the gradient pass (forward and backward) and of
  the whole step.
- Mixed precision: CPU autocast casts the same matmul / convolution / attention ops to bf16 as CUDA's,
  but CUDA also runs a list of ops in float32 (group norm, upsampling, exp, pow, ...; ATen's
  autocast_mode.h) that CPU autocast leaves in bf16. `CudaAutocastPolicy` adds CUDA's float32 list on
  top of CPU autocast, so the saved dtypes are those a GPU run saves.

What this does not see: the CUDA caching allocator's rounding and fragmentation, the CUDA context and
NCCL buffers, kernels' workspaces, and torch.compile (Inductor saves different, usually fewer, tensors
than eager autograd: the numbers here are eager's). docs/memory_edm2xl.md has a worked table.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from scm_graph.bench.common import append_table
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.model import build_model
from scm_graph.objectives import StepInputs, get_objective, get_passes
from scm_graph.objectives.sct import ConsistencyPrep
from scm_graph.ops import use_backend
from scm_graph.paths import output_file
from scm_graph.precision import AMP_DTYPES, autocast
from scm_graph.spec import Spec, distils_guidance, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from scm_graph.train.parallel import full_params, shard_units

GiB = 1024**3
FP32 = 4  # bytes: weights, gradients, optimiser moments and the EMA stay float32 at every precision
ADAM_MOMENTS = 2  # Adam / RAdam: exp_avg and exp_avg_sq per weight (plus one scalar step count per tensor)


# ---------------------------------------------------------------------------------------------
# Weights, gradients, optimiser state, EMA: closed form


@dataclass(frozen=True)
class StateBytes:
    """Per-rank bytes of what lives for the whole run (rank 0's share under FSDP2)."""

    params: int
    grads: int
    optim: int
    ema: int  # DDP's reduction buckets are not a fifth term: with gradient_as_bucket_view=True they hold `grads`

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.ema


def shard_numel(shape: torch.Size | tuple[int, ...], ranks: int) -> int:
    """Elements of rank 0's FSDP2 shard of a weight: dim 0 cut in `ranks` chunks of ceil(d0 / ranks) rows
    (FSDP2 pads every shard to this size)."""
    if not shape:
        return 1
    rest = math.prod(shape[1:])
    return -(-shape[0] // ranks) * rest


def state_bytes(shapes: list[tuple[int, ...]], ranks: int, parallel: str, optim_moments: int = ADAM_MOMENTS) -> StateBytes:
    """Bytes per rank of weights, gradients, optimiser moments and EMA for weights of these shapes.

    'single' (one process) and 'ddp' replicate everything, so a DDP rank holds what one process holds
    (DDP's gradient buckets are the gradients' storage, `gradient_as_bucket_view=True` in
    `train/parallel.wrap`); 'fsdp' shards all four 1/N (rank 0's padded share).
    """
    if parallel == "fsdp":
        n = sum(shard_numel(s, ranks) for s in shapes)
    elif parallel in ("ddp", "single"):
        n = sum(math.prod(s) for s in shapes)
    else:
        raise ValueError(f"parallel must be 'single', 'ddp' or 'fsdp', not {parallel!r}")
    b = n * FP32
    return StateBytes(params=b, grads=b, optim=optim_moments * b, ema=b)


@dataclass(frozen=True)
class FsdpTransient:
    """Full (gathered) weights FSDP2 holds for a while, in bytes (float32 weights)."""

    root: int  # weights outside the units: gathered for the whole step (FSDP2 keeps the root unsharded)
    largest_unit: int  # the biggest unit's weights: gathered during its forward and backward
    full: int  # every weight: what the JVP pass gathers at once (it runs on the plain, full weights)

    @property
    def gradient_pass(self) -> int:
        """Root weights and gradients, two units gathered (the current one and the prefetched next),
        one unit's unsharded gradient before its reduce-scatter: an estimate of FSDP2's default schedule."""
        return 2 * self.root + 2 * self.largest_unit + self.largest_unit


def fsdp_transient(model: nn.Module) -> FsdpTransient:
    units = shard_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    full = sum(p.numel() for p in model.parameters()) * FP32
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units) * FP32
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0) * FP32
    return FsdpTransient(root, largest, full)


# ---------------------------------------------------------------------------------------------
# Measuring tensors without memory: saved tensors and the live set


def storage_key(t: Tensor) -> int | None:
    """Identity of a tensor's storage (the same for all its views), or None for one without storage."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def storage_nbytes(t: Tensor) -> int:
    return t.untyped_storage().nbytes()


def _is_weight_cast(t: Tensor, weights: set[int | None]) -> bool:
    """Whether `t` (or the tensor it is a view of) is a cast of one of `weights` (storage keys):
    autocast's cached half-precision copy of a parameter."""
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(type(nxt).__name__ == "AccumulateGrad" and storage_key(nxt.variable) in weights
               for nxt, _ in fn.next_functions if nxt is not None)


@dataclass
class SavedBytes:
    activations: int = 0  # tensors the forward computed and autograd keeps for backward
    weight_copies: int = 0  # autocast's half-precision copies of the weights (saved by the matmuls / convs)
    weights: int = 0  # the float32 weights themselves (no extra memory: counted with the weights)


class SavedTensors:
    """`saved_tensors_hooks` that sum the storages autograd saves for backward, each storage once.

    Saved tensors are held until the context closes, so a storage address cannot be reused (and
    miscounted) while counting; use it around a forward, not around the backward.
    """

    def __init__(self, weights: list[Tensor]):
        self._weights = {storage_key(w) for w in weights}
        self._seen: set[int] = set()
        self._keep: list[Tensor] = []
        self.bytes = SavedBytes()

    def _pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key is None or key in self._seen:
            return t
        self._seen.add(key)
        self._keep.append(t)
        n = storage_nbytes(t)
        if key in self._weights:
            self.bytes.weights += n
        elif _is_weight_cast(t, self._weights):
            self.bytes.weight_copies += n
        else:
            self.bytes.activations += n
        return t

    @contextmanager
    def count(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            try:
                yield self
            finally:
                self._keep.clear()


class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage allocated inside the mode and still alive, and their peak.

    A storage counts from the op that first returns it until the last tensor viewing it dies (a weakref
    finalizer per returned tensor). Tensors made before the mode (weights, gradients, inputs), and views
    or in-place results of them, are not counted: `peak` is what the computation adds on top.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # key -> [live tensors, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            key = storage_key(t)
            if key is None:
                continue
            entry = self._storages.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {storage_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)}
                if key in inputs:  # a view or in-place result of a tensor from before the mode
                    continue
                entry = self._storages[key] = [0, storage_nbytes(t)]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


# CUDA autocast runs these in float32 (ATen autocast_mode.h: AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE,
# norm); CPU autocast leaves most of them in the input's dtype. Names as torch functions / methods spell them.
CUDA_FP32_OPS = frozenset([
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan",
    "pow", "__pow__", "__rpow__", "float_power", "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm",
    "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
    "upsample_bicubic2d", "prod", "softmax", "log_softmax", "cumprod", "cumsum", "vector_norm", "matrix_norm", "sum", "norm",
    "square",  # CUDA autocast lets square decompose to pow, which is on the list
])


class CudaAutocastPolicy(TorchFunctionMode):
    """While CPU autocast is on, run CUDA autocast's float32 ops in float32 (inputs cast, autocast off
    for the op, as CUDA's fp32 policy does), so a CPU / fake-tensor run saves the dtypes a GPU run saves.
    `F.interpolate` counts as the upsampling op it calls (float32 on CUDA except mode 'area')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "interpolate":
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            fp32 = mode != "area"
        else:
            fp32 = name in CUDA_FP32_OPS
        if not fp32 or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)

        def up(x):
            return x.float() if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

        args, kwargs = tree_map(up, (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs)


class _NoDataDependentChecks(TorchFunctionMode):
    """`F.one_hot` without its value checks (min / max `.item()`), which fake tensors cannot answer under
    `torch.func.jvp`: the same scatter into zeros, the same output, as on CUDA (which skips the checks too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "one_hot":
            x, k = args[0], (args[1] if len(args) > 1 else kwargs.get("num_classes", -1))
            if k < 0:
                raise ValueError("bench memory: one_hot needs num_classes on fake tensors")
            return torch.zeros(*x.shape, k, dtype=torch.int64, device=x.device).scatter_(-1, x.unsqueeze(-1), 1)
        return func(*args, **kwargs)


@contextmanager
def step_precision(precision: str):
    """The train step's autocast (on the CPU device type: fake tensors are CPU tensors) with CUDA's
    float32 list on top; nothing at all for fp32."""
    if AMP_DTYPES[precision] is None:
        yield
        return
    with autocast("cpu", precision), CudaAutocastPolicy():
        yield


# ---------------------------------------------------------------------------------------------
# The passes of the sCT step


def step_inputs(spec: Spec, batch: int, device: torch.device | str = "cpu") -> StepInputs:
    """A synthetic per-rank micro-batch (values do not matter for memory; shapes and dtypes do)."""
    d = spec.data
    shape = (batch, d.channels, d.resolution, d.resolution)
    g = torch.Generator().manual_seed(0)

    def randn(*s):
        return torch.randn(*s, generator=g).to(device)

    return StepInputs(
        x0=randn(*shape) * 0.5,
        z=randn(*shape) * 0.5,
        t=(torch.rand(batch, generator=g) * 1.5 + 0.01).to(device),
        labels=(torch.arange(batch) % max(d.num_classes, 1)).to(device) if spec.net.class_conditional else None,
        dropout_key=torch.tensor(1, device=device),
        r=torch.tensor(0.5, device=device),
        guidance=(1 + torch.rand(batch, generator=g)).to(device) if distils_guidance(spec) else None,
    )


def gradient_pass(model: nn.Module, prep: ConsistencyPrep, adaptive: bool) -> Tensor:
    """The gradient pass of the distributed step (`train/step.py`, `TrainStep._micro`): one forward of the
    network with w_phi(t) (`weight=True`) at the JVP pass's x_t, then the objective's `finish`; the loss."""
    passes = get_passes("sct")
    out = model(*prep.inputs.forward_args(prep.x_t), weight=adaptive)
    F, w = out if adaptive else (out, torch.zeros_like(prep.inputs.t))
    return passes.finish(F, w, prep).loss


@dataclass(frozen=True)
class Activations:
    """Bytes one rank's sCT step adds on top of its weights, gradients, optimiser and EMA, per micro-batch."""

    batch: int
    precision: str
    saved: SavedBytes  # what autograd keeps for backward in the gradient pass
    jvp_peak: int  # largest live set of the JVP pass
    gradient_peak: int  # largest live set of the gradient pass, forward and backward
    step_peak: int  # largest live set of the whole step (the real sCT objective, then backward)


def _prepared(spec: Spec, batch: int):
    """(model, params, inputs), the gradients already allocated (as from the second micro-batch on), so the
    backward accumulates into them and the live set holds only what a step adds."""
    model = build_model(spec).train()
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    return model, params, step_inputs(spec, batch)


@contextmanager
def _tensor_kind(fake: bool):
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _NoDataDependentChecks():
        yield


def measure_activations(spec: Spec, batch: int, precision: str, fake: bool = True) -> Activations:
    """Run the sCT step's passes on fake (meta-backed) tensors, or on real CPU tensors with `fake=False`
    (the tests compare the two on a tiny network), and measure saved bytes and peaks.

    The passes are those of the distributed step (`TrainStep._micro`): `get_passes("sct").prepare` on the
    plain weights (`full_params`) under no_grad, then the gradient pass (`gradient_pass`) and its backward,
    `prepare`'s result already alive, as it is in the step."""
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision=precision))
    cfg = spec.objective
    objective, passes = get_objective("sct"), get_passes("sct")
    # the op and SDPA, as on a GPU: the fake tensors say "cpu", where 'auto' would train through plain ops
    with _tensor_kind(fake), use_backend("math"):
        torch.manual_seed(0)
        model, params, inp = _prepared(spec, batch)
        full = full_params(model)  # the plain, detached weights and buffers the JVP pass runs on

        with LiveBytes() as live, torch.no_grad(), step_precision(precision):
            prep = passes.prepare(model, full, inp, cfg)  # the JVP pass; its result stays alive for the gradient pass
        jvp_peak = live.peak

        saved = SavedTensors(list(params.values()))  # the gradient pass's saved tensors (the JVP pass saves none)
        with saved.count(), step_precision(precision):
            gradient_pass(model, prep, cfg.adaptive_weighting)
        saved_bytes = saved.bytes

        with LiveBytes() as live:
            with step_precision(precision):
                loss = gradient_pass(model, prep, cfg.adaptive_weighting)
            loss.backward()
            del loss
        gradient_peak = live.peak
        del prep, full

        with LiveBytes() as live:
            with step_precision(precision):
                loss = objective(model, params, inp, cfg).loss
            loss.backward()
            del loss
        step_peak = live.peak
    return Activations(batch, precision, saved_bytes, jvp_peak, gradient_peak, step_peak)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Column:
    """One way to run: a world size and a strategy ('single', 'ddp', 'fsdp')."""

    ranks: int
    parallel: str

    @property
    def title(self) -> str:
        return "1 process" if self.parallel == "single" else f"{self.ranks} x {'DDP' if self.parallel == 'ddp' else 'FSDP2'}"


def columns(ranks: list[int]) -> list[Column]:
    out = []
    for n in ranks:
        out += [Column(1, "single")] if n == 1 else [Column(n, "ddp"), Column(n, "fsdp")]
    return out


def _fmt(b: int | None, units: str) -> str:
    if b is None:
        return "–"
    return f"{b:,}" if units == "bytes" else f"{b / GiB:.2f}"


@dataclass(frozen=True)
class Estimate:
    state: StateBytes
    jvp_phase: int  # the JVP pass's live set (+ the full weights FSDP2 gathers for it)
    gradient_phase: int  # the gradient pass's live set (+ FSDP2's gathered units)

    @property
    def peak(self) -> int:
        return self.state.total + max(self.jvp_phase, self.gradient_phase)


def estimate(col: Column, shapes: list[tuple[int, ...]], act: Activations, fsdp: FsdpTransient) -> Estimate:
    state = state_bytes(shapes, col.ranks, col.parallel)
    extra_jvp = fsdp.full if col.parallel == "fsdp" else 0
    extra_grad = fsdp.gradient_pass if col.parallel == "fsdp" else 0
    return Estimate(state, act.jvp_peak + extra_jvp, act.gradient_peak + extra_grad)


def memory_table(cols: list[Column], shapes: list[tuple[int, ...]], acts: dict[int, Activations], batches: dict[Column, int],
                 fsdp: FsdpTransient, precision: str, units: str = "GiB") -> str:
    """One markdown table: a row per quantity, a column per (world size, strategy), at one precision."""
    u = "bytes" if units == "bytes" else "GiB"
    ests = {c: estimate(c, shapes, acts[batches[c]], fsdp) for c in cols}
    half = AMP_DTYPES[precision] is not None

    def row(label: str, f) -> str:
        return f"| {label} | " + " | ".join(_fmt(f(c), units) for c in cols) + " |"

    lines = [
        f"| per rank ({u}), {precision} | " + " | ".join(c.title for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| micro-batch per rank | " + " | ".join(str(batches[c]) for c in cols) + " |",
        row("weights (fp32)", lambda c: ests[c].state.params),
        row("gradients (fp32; under DDP they are the reduction buckets, gradient_as_bucket_view=True: no second copy)",
            lambda c: ests[c].state.grads),
        row("optimiser state (Adam / RAdam: 2 fp32 moments)", lambda c: ests[c].state.optim),
        row("EMA copy (fp32)", lambda c: ests[c].state.ema),
        row("**static total**", lambda c: ests[c].state.total),
        row("saved activations of the gradient pass (measured)", lambda c: acts[batches[c]].saved.activations),
    ]
    if half:
        lines.append(row(f"{precision} weight copies autocast saves for backward (measured; not sharded by FSDP2)",
                         lambda c: acts[batches[c]].saved.weight_copies))
    lines += [
        row("gradient pass peak: forward + backward live set (measured)", lambda c: acts[batches[c]].gradient_peak),
        row("JVP pass peak live set (measured)", lambda c: acts[batches[c]].jvp_peak),
        row("whole sCT step peak, real objective + backward (measured, check)", lambda c: acts[batches[c]].step_peak),
        row("FSDP2: gathered in the gradient pass (estimate: root weights + grads, 3 x largest block)",
            lambda c: fsdp.gradient_pass if c.parallel == "fsdp" else None),
        row("FSDP2: full weights gathered at once for the JVP pass", lambda c: fsdp.full if c.parallel == "fsdp" else None),
        row("**peak per rank: static + max(JVP phase, gradient phase)**", lambda c: ests[c].peak),
    ]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def report(spec: Spec, spec_path: str, argv: list[str], ranks: list[int], batches: dict[Column, int], precisions: list[str],
           units: str = "GiB") -> str:
    with torch.device("meta"):
        model = build_model(spec)
    shapes = [tuple(p.shape) for p in model.parameters()]
    n_params = sum(math.prod(s) for s in shapes)
    fsdp = fsdp_transient(model)
    cols = columns(ranks)
    d, n = spec.data, spec.net
    arch = dataclasses.asdict(n.unet if n.arch == "unet" else n.dit)
    lines = [
        f"## `just bench memory` — {spec_path} — {_count(n_params)} parameters",
        "",
        f"Command: `python -m scm_graph.bench memory {shlex.join(argv)}`",
        "",
        (f"Network: {n.arch} {', '.join(f'{k} {v}' for k, v in arch.items())}; dropout {n.dropout}; "
         f"{'class-conditional on ' + str(d.num_classes) + ' classes' if n.class_conditional else 'unconditional'}; "
         f"data {d.channels}x{d.resolution}x{d.resolution}; **{n_params:,} parameters** "
         f"({n_params * FP32 / GiB:.2f} GiB in fp32); optimiser {spec.optim.kind}; torch {torch.__version__}. "
         f"Largest FSDP2 block: {fsdp.largest_unit / GiB:.3f} GiB of fp32 weights; root (weights outside the blocks): "
         f"{fsdp.root / GiB:.3f} GiB."),
        "",
    ]
    for precision in precisions:
        acts = {b: measure_activations(spec, b, precision) for b in sorted(set(batches.values()))}
        lines += [memory_table(cols, shapes, acts, batches, fsdp, precision, units), ""]
    return "\n".join(lines)


def _shaped(spec: Spec, shape: list[int] | None, classes: int | None) -> Spec:
    """The spec with its data shape: from --shape / --classes, else the known shard sets' shapes."""
    d = spec.data
    if shape:
        c, h, w = shape
        if h != w or min(shape) < 1:
            raise UserError(f"--shape C H W: square images with positive sizes, not {c} {h} {w}")
        d = dataclasses.replace(d, channels=c, resolution=h)
    elif not d.resolution or not d.channels:
        known = {"digits": (1, 8, 10), "cifar10": (3, 32, 10)}
        if d.name not in known:
            raise UserError(f"data set {d.name!r} has no known shape: pass --shape C H W (and --classes K)")
        c, r, k = known[d.name]
        d = dataclasses.replace(d, channels=c, resolution=r, num_classes=d.num_classes or k)
    if classes is not None:
        d = dataclasses.replace(d, num_classes=classes)
    if spec.net.class_conditional and not d.num_classes:
        raise UserError("a class-conditional network needs --classes K")
    return dataclasses.replace(spec, data=d)


def micro_batches(spec: Spec, ranks: list[int], batch: int = 0) -> dict[Column, int]:
    """Each column's per-rank micro-batch: `batch`, else train.batch / (N x train.accum)."""
    accum = getattr(spec.train, "accum", 1)  # micro-batches per step
    out = {}
    for c in columns(ranks):
        b = batch or spec.train.batch // (c.ranks * accum)
        if b < 1:
            raise UserError(f"train.batch {spec.train.batch} leaves no sample per rank for {c.ranks} ranks x {accum} micro-batches")
        out[c] = b
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    p = ArgumentParser(prog="python -m scm_graph.bench memory", allow_abbrev=False,
                       description="Per-rank memory of sCT training with N processes (DDP / FSDP2), measured on meta tensors. "
                                   "Other --section.field flags override the spec (as `python -m scm_graph.train`).")
    p.add_argument("--spec", default="specs/digits_sct.py", help="spec whose network to size")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="world sizes N (processes)")
    p.add_argument("--batch", type=int, default=0,
                   help="per-rank micro-batch (default: train.batch / (N x train.accum) for each N)")
    p.add_argument("--precision", nargs="+", choices=list(AMP_DTYPES), default=None,
                   help="autocast precision(s) (default: the spec's train.precision)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="data shape (e.g. 4 64 64 for SD-VAE latents of 512x512)")
    p.add_argument("--classes", type=int, help="number of classes of a class-conditional network")
    p.add_argument("--units", choices=("GiB", "bytes"), default="GiB", help="table units")
    p.add_argument("--out", help="append the markdown report to this file (e.g. docs/memory.md)")
    a, overrides = p.parse_known_args(argv)
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    if any(n < 1 for n in a.ranks) or a.batch < 0:
        raise UserError("--ranks must be at least 1 and --batch at least 0")
    spec = apply_overrides(read_spec_file(a.spec), overrides, prog="python -m scm_graph.bench memory")
    validate(spec)  # before the data shape: --shape may give a channel count data.channels cannot hold (4 latents)
    if spec.objective.kind != "sct":
        raise UserError(f"bench memory sizes the sCT step; this spec's objective is {spec.objective.kind!r} (override --objective.kind sct)")
    spec = _shaped(spec, a.shape, a.classes)
    batches = micro_batches(spec, a.ranks, a.batch)
    precisions = list(dict.fromkeys(a.precision or [spec.train.precision]))
    print(f"bench memory: {a.spec}, ranks {' '.join(map(str, a.ranks))}, {' / '.join(precisions)}", flush=True)
    text = report(spec, a.spec, argv, a.ranks, batches, precisions, a.units)
    print(text)
    if a.out:
        append_table(a.out, text)
