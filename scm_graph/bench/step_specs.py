"""`just bench step --all` (or several `--spec`s): every spec's own train step beside the diffusion step of its
network, eager and compiled, at each precision, in one table.

Each spec's step runs with its own objective (sCT, sCD with a frozen teacher of the same network, iCT, discrete-time
sCM or diffusion) on its own network and data shape, through `bench.step_timing.time_step`. The diffusion step of a network
is timed once per (network, optimiser, precision, mode, batch) and shared by every spec with those, so a ratio
compares two measurements of one process. Specs whose network is over `max_params` are listed with the reason, not timed: a
2-core CPU cannot hold an EDM2-XXL's optimiser state, nor compile its step in useful time. Specs that cannot be
benchmarked (a shape that only their shards give) are listed with their one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scm_graph.bench.common import device_name
from scm_graph.bench.step_timing import StepTiming, bench_spec, time_step
from scm_graph.errors import UserError
from scm_graph.model import build_model, num_params
from scm_graph.spec import Spec

SPEC_DIR = Path("specs")


def shipped_specs(spec_dir: Path = SPEC_DIR) -> list[str]:
    """Every spec file a user can train (specs/*.py, not the `_` helpers), sorted."""
    return [str(p) for p in sorted(spec_dir.glob("*.py")) if not p.name.startswith("_")]


def diffusion_key(spec: Spec) -> str:
    """What makes two specs' diffusion steps the same: the network, the data shape it is built for, the optimiser,
    the adaptive weighting (w_phi's forward and backward) and the micro-batches."""
    d = spec.data
    return repr((spec.net, d.channels, d.resolution, d.num_classes, spec.optim, spec.objective.adaptive_weighting, spec.train.accum))


def count_params(spec: Spec) -> int:
    """The parameters of a spec's network, built on the meta device (structure only: no memory, even for EDM2-XXL)."""
    with torch.device("meta"):
        return num_params(build_model(spec))


def network_name(spec: Spec, n: int) -> str:
    """A short description of a spec's network with `n` parameters, e.g. 'edm2 c192, 3x64x64, 280.52 M'."""
    net = spec.net
    width = {"edm2": lambda: f" c{net.edm2.channels}", "dit": lambda: f" w{net.dit.width}d{net.dit.depth}"}.get(net.arch, lambda: "")()
    return f"{net.arch}{width}, {spec.data.channels}x{spec.data.resolution}x{spec.data.resolution}, {n / 1e6:.2f} M"


@dataclass
class SpecSteps:
    """One spec at one precision: its own step and its network's diffusion step, per mode; or why it was not timed."""

    path: str
    kind: str = ""  # the spec's objective
    network: str = ""
    precision: str = ""  # "fp32"; for a row not timed at any precision, all of them ("fp32, bf16")
    batch: int = 0
    step: dict[str, StepTiming] = field(default_factory=dict)  # mode -> timing
    diffusion: dict[str, StepTiming] = field(default_factory=dict)
    skipped: str = ""  # why nothing was timed
    failed: str = ""  # the mode whose step failed, and why (the modes before it keep their timings)


@dataclass
class Timer:
    """How every step is timed (`bench.step_timing.time_step`'s arguments), and the diffusion steps timed so far."""

    dev: torch.device
    steps: int
    warmup: int
    rounds: int
    shared: dict[tuple[str, str, str, int], StepTiming] = field(default_factory=dict)  # (diffusion_key, precision, mode, batch)

    def time(self, path: str, spec: Spec, kind: str, mode: str, batch: int, precision: str) -> StepTiming:
        """One step timed, with a progress line; a diffusion step is timed once per `diffusion_key` and reused."""
        key = (diffusion_key(spec), precision, mode, batch)
        if kind == "diffusion" and key in self.shared:
            return self.shared[key]
        torch._dynamo.reset()
        t = time_step(spec, kind, mode == "compiled", batch, self.steps, self.warmup, self.dev, self.rounds, precision)
        print(f"  {path} {kind:9s} {precision:4s} {mode:8s} batch {batch:4d}: {t.images_per_s:9.1f} img/s "
              f"{t.ms_per_step:9.2f} ms/step (warm-up {t.warmup_s:.1f} s)", flush=True)
        if kind == "diffusion":
            self.shared[key] = t
        return t


def bench_specs(paths: list[str], batch: int, max_batch: int, timer: Timer, precisions: tuple[str, ...],
                modes: tuple[str, ...], max_params: float) -> list[SpecSteps]:
    """Time every spec of `paths` (see the module docstring), with progress lines as it goes."""
    rows = []
    for path in paths:
        try:
            spec = bench_spec(path)
        except UserError as e:
            rows.append(SpecSteps(path, skipped=str(e)))
            print(f"  {path}: not timed: {e}", flush=True)
            continue
        b = batch or min(spec.train.batch, max_batch)
        params = count_params(spec)
        kind, net = spec.objective.kind, network_name(spec, params)
        if max_params and params > max_params:  # one row for every precision
            skipped = f"{params / 1e6:.2f} M parameters, over --max-params {max_params / 1e6:g} M"
            rows.append(SpecSteps(path, kind, net, ", ".join(precisions), b, skipped=skipped))
            continue
        for precision in precisions:
            row = SpecSteps(path, kind, net, precision, b)
            rows.append(row)
            for mode in modes:
                try:
                    row.step[mode] = timer.time(path, spec, kind, mode, b, precision)
                    row.diffusion[mode] = timer.time(path, spec, "diffusion", mode, b, precision)
                except torch.OutOfMemoryError:  # the device's memory, not the spec: say so and go on with the others
                    row.failed = f"{mode}: out of memory at batch {b}"
                except Exception as e:  # noqa: BLE001 (a compile failure must not lose the other specs' timings)
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    row.failed = f"{mode}: {type(e).__name__}: {first_line}"
                if row.failed:
                    row.step.pop(mode, None)
                    print(f"  {path} {precision}: failed: {row.failed}", flush=True)
                    break
            if row.failed and timer.dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _ips(t: StepTiming | None) -> str:
    return "–" if t is None else format(t.images_per_s, ".1f" if t.images_per_s >= 1 else ".3g")


def _ratio(a: StepTiming | None, b: StepTiming | None) -> str:
    return "–" if a is None or b is None else f"{a.ms_per_step / b.ms_per_step:.2f}x"


def specs_table(rows: list[SpecSteps], dev: torch.device, steps: int, rounds: int) -> str:
    """One markdown table of every spec: images/s eager and compiled, and the step / diffusion-step time ratios."""
    precisions = list(dict.fromkeys(p for r in rows if r.precision for p in r.precision.split(", ")))
    lines = [
        f"## `just bench step --all` — {device_name(dev)}, {' / '.join(precisions)}",
        "",
        (f"Device: {device_name(dev)}; torch {torch.__version__}; best of {rounds} rounds of {steps} steps after warm-up "
         "(warm-up includes compilation, or a compile-cache hit); synthetic data; each spec's own step (its objective, "
         "network, optimiser and clipping) against the diffusion step of the same network, timed in the same process. "
         "One compile cache serves the whole run, so a compiled warm-up may reuse kernels an earlier spec compiled: "
         "it is not a cold start."),
        "",
        ("| spec | network | step | precision | batch | eager img/s | compiled img/s | step / diffusion, eager "
         "| step / diffusion, compiled | compiled warm-up (s) |"),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = Path(r.path).stem
        if r.skipped:
            lines.append(f"| {name} | {r.network or '–'} | {r.kind or '–'} | {r.precision or '–'} | – | not timed: {r.skipped} "
                         "| | | | |")
            continue
        c = r.step.get("compiled")
        warm = "–" if c is None else f"{c.warmup_s:.0f}"
        if r.failed:
            warm += f" (failed: {r.failed.replace('|', '/')})"
        lines.append(f"| {name} | {r.network} | {r.kind} | {r.precision} | {r.batch} | {_ips(r.step.get('eager'))} | {_ips(c)} | "
                     f"{_ratio(r.step.get('eager'), r.diffusion.get('eager'))} | {_ratio(c, r.diffusion.get('compiled'))} | {warm} |")
    lines.append("")
    return "\n".join(lines)

