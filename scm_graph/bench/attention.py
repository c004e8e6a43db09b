"""`just bench attention`: attention forward + JVP (O and dO), fused op vs the alternatives.

For each N and head dim: time and peak memory of computing O and dO for tangents (dQ, dK, dV) with
  fused  - `scm_graph.ops.jvp_attention` (the Triton kernel on CUDA, the math fallback on CPU),
  math   - `torch.func.jvp` over plain softmax attention (what autograd's forward mode does),
  jfa    - the `jvp_flash_attention` package under `torch.func.jvp`, when it is installed,
and, forward only (O without a tangent: how close the fused kernel gets to a plain flash forward),
  fused fwd - the same Triton kernel without tangents (the math fallback on CPU),
  sdpa fwd  - torch's `scaled_dot_product_attention` (FlashAttention-2 or cuDNN on a GPU),
and the gradient pass (dQ, dK, dV of <dO_out, O> after a forward, as the sCT step's backward runs it),
  fused fwd+bwd - the forward kernel, then the op's backward kernels (the math fallback on CPU),
  sdpa fwd+bwd  - autograd through torch's SDPA (FlashAttention-2's backward or cuDNN's on a GPU),
all in one process, side by side on the same inputs. TFLOP/s counts 12 N^2 D per head for forward + JVP
(forward 4, JVP 8: six matmuls), 4 N^2 D for a forward and 14 N^2 D for forward + backward (backward 10:
S recomputed and four products). Peak memory is measured on CUDA only (max_memory_allocated minus the
inputs). Every JVP method's dO is checked against the fused one, every forward's O against the fused
forward's, and every gradient pass's dQ, dK and dV against the fused one's (the worst of the three); a
disagreement is reported, not hidden.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.func import jvp

from scm_graph.bench.common import append_table, device_name, synchronize
from scm_graph.device import pick_device
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.ops import jvp_attention
from scm_graph.ops.routing import kernels_for
from scm_graph.paths import output_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class AttnTiming:
    method: str
    n: int
    head_dim: int
    ms: float  # median over reps; nan when it did not run
    tflops: float
    peak_mib: float  # extra memory over the inputs; nan on CPU
    max_err: float  # max |dO - dO_fused| / max |dO_fused|
    note: str = ""


def math_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def _fused_forward(q, k, v):
    """O from the fused op's kernel without tangents (a plain flash forward); the kernels the op runs on q."""
    return kernels_for(q).fwd_jvp(q, k, v, None, None, None, q.shape[-1] ** -0.5)[0]


def _forward_ad(fn, primals, tangents):
    """(O, dO) through autograd's forward mode (dual tensors), which jvp_flash_attention implements (not functorch's jvp)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        o = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        p, t = fwAD.unpack_dual(o)
    return p, t


def _fused_gradients(q, k, v, g):
    """(dQ, dK, dV) stacked: the fused op's forward kernel without tangents, then its backward kernels from the
    saved O and LSE (whichever kernels the op would run on q: `ops.routing.kernels_for`)."""
    kernels = kernels_for(q)
    scale = q.shape[-1] ** -0.5
    o, _, lse = kernels.fwd_jvp(q, k, v, None, None, None, scale)
    return torch.stack(kernels.bwd(g, q, k, v, o, lse, scale))


def _sdpa_gradients(q, k, v, g):
    """(dQ, dK, dV) stacked, by autograd through torch's scaled_dot_product_attention."""
    with torch.enable_grad():
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.stack(torch.autograd.grad(o, (q, k, v), g))


@dataclass(frozen=True)
class Method:
    fn: object  # (q, k, v, dq, dk, dv) -> (O, dO), (O, None) or (stacked dQ, dK, dV, None)
    flops: float  # per head, in units of N^2 D: 12 forward + JVP, 4 forward, 14 forward + backward
    baseline: str  # the row its speed-up and its error are measured against
    gradients: bool = False  # its output stacks dQ, dK, dV: the error is the worst of the three


def _methods() -> dict[str, Method]:
    out = {
        "fused": Method(lambda q, k, v, dq, dk, dv: jvp_attention(q, k, v, dq, dk, dv), 12.0, "fused"),
        "math": Method(lambda q, k, v, dq, dk, dv: jvp(math_attention, (q, k, v), (dq, dk, dv)), 12.0, "fused"),
    }
    try:
        from jvp_flash_attention.jvp_attention import (
            attention as jfa,  # optional third-party baseline
        )
    except ImportError:
        pass
    else:
        out["jfa"] = Method(lambda q, k, v, dq, dk, dv: _forward_ad(jfa, (q, k, v), (dq, dk, dv)), 12.0, "fused")
    out["fused fwd"] = Method(lambda q, k, v, *_: (_fused_forward(q, k, v), None), 4.0, "fused fwd")
    out["sdpa fwd"] = Method(lambda q, k, v, *_: (torch.nn.functional.scaled_dot_product_attention(q, k, v), None), 4.0, "fused fwd")
    # the cotangent dO_out of the gradient pass: the fourth input (dQ's slot; the tangents are not used here)
    out["fused fwd+bwd"] = Method(lambda q, k, v, g, *_: (_fused_gradients(q, k, v, g), None), 14.0, "fused fwd+bwd", True)
    out["sdpa fwd+bwd"] = Method(lambda q, k, v, g, *_: (_sdpa_gradients(q, k, v, g), None), 14.0, "fused fwd+bwd", True)
    return out


def time_one(fn, args, dev: torch.device, reps: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """(median ms, peak extra MiB, dO, or O for a forward, or the stacked gradients) of fn(*args)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        synchronize(dev)
        base = 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            o, do = fn(*args)
            synchronize(dev)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
    return statistics.median(times), peak, (o if do is None else do)


def max_error(out: torch.Tensor, ref: torch.Tensor, gradients: bool) -> float:
    """max |out - ref| / max |ref|; for stacked (dQ, dK, dV), the worst of the three, each against its own scale."""
    parts = zip(out, ref) if gradients else [(out, ref)]
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in parts)


def run(ns: list[int], head_dims: list[int], bh: int, heads: int, dtype: torch.dtype, dev: torch.device, reps: int, warmup: int, max_math_n: int) -> list[AttnTiming]:
    from rich.progress import track

    rows: list[AttnTiming] = []
    methods = _methods()
    cases = [(n, d) for d in head_dims for n in ns]
    for n, d in track(cases, description="bench attention", transient=True):
        gen = torch.Generator(device=dev).manual_seed(0)
        shape = (bh // heads, heads, n, d)
        args = [torch.randn(shape, generator=gen, device=dev, dtype=dtype) for _ in range(6)]
        refs: dict[str, torch.Tensor] = {}
        for name, m in methods.items():
            flops = m.flops * n * n * d * bh
            if name == "math" and n > max_math_n:
                rows.append(AttnTiming(name, n, d, float("nan"), float("nan"), float("nan"), float("nan"), f"skipped (N > {max_math_n})"))
                continue
            try:
                ms, peak, out = time_one(m.fn, args, dev, reps, warmup)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(AttnTiming(name, n, d, float("nan"), float("nan"), float("nan"), float("nan"), "out of memory"))
                continue
            except Exception as e:  # noqa: BLE001  (a baseline that does not run here is a row saying so, not a lost table)
                rows.append(AttnTiming(name, n, d, float("nan"), float("nan"), float("nan"), float("nan"), f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"))
                continue
            ref = refs.setdefault(m.baseline, out.float())
            err = max_error(out.float(), ref, m.gradients)
            rows.append(AttnTiming(name, n, d, ms, flops / (ms * 1e-3) / 1e12, peak, err))
            del out
    return rows


def to_markdown(rows: list[AttnTiming], device: str, dtype: str, bh: int, heads: int) -> str:
    lines = [
        f"# Attention forward + JVP: {device}",
        "",
        (f"torch {torch.__version__}, {dtype}, batch x heads = {bh} ({heads} heads), one process, side by side. "
        "TFLOP/s counts 12 N^2 D per head for forward + JVP, 4 N^2 D for the forward-only rows (fwd) and "
        "14 N^2 D for forward + backward (fwd+bwd); peak = extra memory over the inputs (CUDA only); "
        "err = max |dO - dO_fused| / max |dO_fused| (fwd rows: the same for O against the fused forward's; "
        "fwd+bwd rows: the worst of dQ, dK and dV against the fused op's). Speed-up: this row's time over "
        "the fused op's (fwd rows: over the fused forward's; fwd+bwd rows: over the fused gradient pass's)."),
        "",
        "| head dim | N | method | ms | TFLOP/s | peak MiB | err | speed-up of fused | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    base = {(r.method, r.n, r.head_dim): r.ms for r in rows}
    methods = _methods()
    for r in rows:
        b = methods[r.method].baseline if r.method in methods else "fused"
        f = base.get((b, r.n, r.head_dim), float("nan"))
        speed = f"{r.ms / f:.2f}x" if r.method != b and r.ms == r.ms and f == f else ""
        note = r.note.replace("|", "\\|")  # a failure's message may hold pipes
        lines.append(
            f"| {r.head_dim} | {r.n} | {r.method} | {r.ms:.3f} | {r.tflops:.3g} | {r.peak_mib:.1f} | {r.max_err:.1e} | {speed} | {note} |".replace("nan", "-")
        )
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="scm_graph.bench attention", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths (default 256 1024 4096 16384 on CUDA, 256 1024 on CPU)")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bh", type=int, default=16, help="batch x heads")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-math-n", type=int, default=16384, help="skip the math JVP above this N")
    p.add_argument("--out", default="", help="also append the markdown table to this file (e.g. docs/bench_attention_h100.md)")
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    ns = a.n or ([256, 1024, 4096, 16384] if dev.type == "cuda" else [256, 1024])
    if a.bh % a.heads or any(n <= 0 for n in ns) or a.reps <= 0:
        raise UserError("--bh must be a multiple of --heads; --n and --reps must be positive")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    rows = run(ns, a.head_dim, a.bh, a.heads, DTYPES[a.dtype], dev, a.reps, a.warmup, a.max_math_n)
    md = to_markdown(rows, device_name(dev), a.dtype, a.bh, a.heads)
    print(md)
    if a.out:
        append_table(a.out, md)
