"""`just bench attention`: attention forward + JVP (O and dO), fused op vs the alternatives.

For each N and head dim: time and peak memory of computing O and dO for tangents (dQ, dK, dV) with
  fused  - `scm_graph.ops.jvp_attention` (the Triton kernel on CUDA, the math fallback on CPU),
  math   - `torch.func.jvp` over plain softmax attention (what autograd's forward mode does),
  jfa    - the `jvp_flash_attention` package under `torch.func.jvp`, when it is installed,
all in one process, side by side on the same inputs. TFLOP/s counts 12 N^2 D per head (forward 4,
JVP 8: six matmuls). Peak memory is measured on CUDA only (max_memory_allocated minus the inputs).
Every method's dO is checked against the fused one; a disagreement is reported, not hidden.
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


def _methods() -> dict:
    out = {
        "fused": lambda q, k, v, dq, dk, dv: jvp_attention(q, k, v, dq, dk, dv),
        "math": lambda q, k, v, dq, dk, dv: jvp(math_attention, (q, k, v), (dq, dk, dv)),
    }
    try:
        from jvp_flash_attention.jvp_attention import (
            attention as jfa,  # optional third-party baseline
        )
    except ImportError:
        return out
    out["jfa"] = lambda q, k, v, dq, dk, dv: jvp(jfa, (q, k, v), (dq, dk, dv))
    return out


def time_one(fn, args, dev: torch.device, reps: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """(median ms, peak extra MiB, dO) of fn(*args)."""
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
    return statistics.median(times), peak, do


def run(ns: list[int], head_dims: list[int], bh: int, heads: int, dtype: torch.dtype, dev: torch.device, reps: int, warmup: int, max_math_n: int) -> list[AttnTiming]:
    from rich.progress import track

    rows: list[AttnTiming] = []
    methods = _methods()
    cases = [(n, d) for d in head_dims for n in ns]
    for n, d in track(cases, description="bench attention", transient=True):
        gen = torch.Generator(device=dev).manual_seed(0)
        shape = (bh // heads, heads, n, d)
        args = [torch.randn(shape, generator=gen, device=dev, dtype=dtype) for _ in range(6)]
        flops = 12.0 * n * n * d * bh
        ref = None
        for name, fn in methods.items():
            if name == "math" and n > max_math_n:
                rows.append(AttnTiming(name, n, d, float("nan"), float("nan"), float("nan"), float("nan"), f"skipped (N > {max_math_n})"))
                continue
            try:
                ms, peak, do = time_one(fn, args, dev, reps, warmup)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(AttnTiming(name, n, d, float("nan"), float("nan"), float("nan"), float("nan"), "out of memory"))
                continue
            if ref is None:
                ref = do.float()
            err = ((do.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            rows.append(AttnTiming(name, n, d, ms, flops / (ms * 1e-3) / 1e12, peak, err))
            del do
    return rows


def to_markdown(rows: list[AttnTiming], device: str, dtype: str, bh: int, heads: int) -> str:
    lines = [
        f"# Attention forward + JVP: {device}",
        "",
        f"torch {torch.__version__}, {dtype}, batch x heads = {bh} ({heads} heads), one process, side by side. "
        "TFLOP/s counts 12 N^2 D per head; peak = extra memory over the inputs (CUDA only); "
        "err = max |dO - dO_fused| / max |dO_fused|.",
        "",
        "| head dim | N | method | ms | TFLOP/s | peak MiB | err | speed-up of fused | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    fused = {(r.n, r.head_dim): r.ms for r in rows if r.method == "fused"}
    for r in rows:
        f = fused.get((r.n, r.head_dim), float("nan"))
        speed = f"{r.ms / f:.2f}x" if r.method != "fused" and r.ms == r.ms and f == f else ""
        lines.append(
            f"| {r.head_dim} | {r.n} | {r.method} | {r.ms:.3f} | {r.tflops:.3g} | {r.peak_mib:.1f} | {r.max_err:.1e} | {speed} | {r.note} |".replace("nan", "-")
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
