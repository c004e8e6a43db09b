"""`python -m scm_graph.bench step [--spec specs/digits_sct.py] [--batch 128] [--precision fp32 bf16]` (or `just bench step`).

Images/s of the sCT and diffusion train steps, eager and compiled, at each asked precision
(fp32 / bf16 / fp16 autocast), side by side in one process on the same synthetic batch, with the
network of the given spec (any arch: it is built by `build_model`). Prints a markdown table naming the
device and precisions and (with --out) appends it to a file under docs/.
`--fused-pass on off` times the consistency step both ways (`objective.fused_pass`); `--host-read` also times
each step with its update decided on the host (`TrainStep.device_skip` off: one host sync per step, the CPU's way).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from scm_graph.bench.common import append_table, device_name, synchronize
from scm_graph.device import pick_device
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.model import build_model, num_params
from scm_graph.objectives import StepInputs
from scm_graph.paths import output_file
from scm_graph.precision import AMP_DTYPES
from scm_graph.spec import Spec, distils_guidance, validate
from scm_graph.specfile import read_spec_file
from scm_graph.train.step import TrainStep


@dataclass
class StepTiming:
    objective: str
    mode: str  # "eager" / "compiled"
    precision: str  # "fp32" / "bf16" / "fp16"
    images_per_s: float
    ms_per_step: float
    warmup_s: float  # first steps, including compilation
    fused_pass: str = "auto"  # objective.fused_pass of the consistency step
    host_read_ms: float | None = None  # ms per step with the update decided on the host (--host-read)

    @property
    def label(self) -> str:
        return self.objective if self.fused_pass == "auto" or self.objective == "diffusion" else f"{self.objective}, fused pass {self.fused_pass}"


def time_step(spec: Spec, kind: str, compile: bool, batch: int, steps: int, warmup: int, dev: torch.device, rounds: int = 3,
              precision: str = "fp32", fused_pass: str = "auto", host_read: bool = False) -> StepTiming:
    spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, kind=kind, fused_pass=fused_pass),
                               train=dataclasses.replace(spec.train, precision=precision))
    torch.manual_seed(0)
    model = build_model(spec).to(dev).train()
    teacher = None
    if kind == "scd":  # a frozen teacher of the same network (its weights do not matter for the timing)
        t_spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, kind="diffusion"))
        teacher = build_model(t_spec).to(dev).eval().requires_grad_(False)
    step = TrainStep(model, spec, compile=compile, teacher=teacher)
    d = spec.data
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (batch, d.channels, d.resolution, d.resolution)
    labels = torch.arange(batch, device=dev) % d.num_classes if spec.net.class_conditional else None
    t = torch.rand(batch, generator=g, device=dev) * 1.5 + 0.01
    inp = StepInputs(
        torch.randn(shape, generator=g, device=dev) * 0.5,
        torch.randn(shape, generator=g, device=dev) * 0.5,
        t,
        labels,
        torch.tensor(1, device=dev),
        torch.tensor(0.5, device=dev),
        1 + torch.rand(batch, generator=g, device=dev) if distils_guidance(spec) else None,  # sCD: the CFG scale s
        t * 0.9 if kind == "ict" else None,  # iCT: the earlier level of each pair
    )
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(inp)
    synchronize(dev)
    warm = time.perf_counter() - t0

    def best() -> float:
        dt = float("inf")
        for _ in range(rounds):  # best of several rounds: robust to a noisy machine
            t1 = time.perf_counter()
            for _ in range(steps):
                step(inp)
            synchronize(dev)
            dt = min(dt, (time.perf_counter() - t1) / steps)
        return dt

    dt = best()
    read_ms = None
    if host_read:  # the same step deciding its update on the host: it waits for the step's flags every step
        step.update.settle()  # nothing of the device path left pending
        step.device_skip = False
        read_ms = best() * 1e3
    return StepTiming(kind, "compiled" if compile else "eager", precision, batch / dt, dt * 1e3, warm, fused_pass, read_ms)


MODES = ("eager", "compiled")


def consistency_kind(spec: Spec) -> str:
    """The consistency objective timed beside diffusion: the spec's own ('sct' or 'scd'), else 'sct'."""
    return spec.objective.kind if spec.objective.kind != "diffusion" else "sct"


def bench_step(spec: Spec, batch: int, steps: int, warmup: int, dev: torch.device, rounds: int = 3,
               precisions: tuple[str, ...] = ("fp32",), modes: tuple[str, ...] = MODES,
               fused_passes: tuple[str, ...] = ("auto",), host_read: bool = False) -> list[StepTiming]:
    rows = []
    runs = [(consistency_kind(spec), f) for f in fused_passes] + [("diffusion", "auto")]
    for precision in precisions:
        for mode in modes:
            for kind, fused in runs:
                torch._dynamo.reset()
                rows.append(time_step(spec, kind, mode == "compiled", batch, steps, warmup, dev, rounds, precision, fused, host_read))
                r = rows[-1]
                read = f", {r.host_read_ms:.2f} ms deciding on the host" if r.host_read_ms is not None else ""
                print(f"  {r.label:9s} {r.precision:4s} {r.mode:8s} {r.images_per_s:9.1f} img/s  {r.ms_per_step:8.2f} ms/step"
                      f"{read}  (warm-up {r.warmup_s:.1f} s)", flush=True)
    return rows


def _ratio(a: StepTiming | None, b: StepTiming | None, speed: bool) -> str:
    """a / b as 'N.NNx' (images/s if speed else step time); a dash where either is missing."""
    if a is None or b is None:
        return "–"
    return f"{a.images_per_s / b.images_per_s:.2f}x" if speed else f"{a.ms_per_step / b.ms_per_step:.2f}x"


def step_table(rows: list[StepTiming], spec_path: str, spec: Spec, batch: int, dev: torch.device) -> str:
    by = {(r.label, r.precision, r.mode): r for r in rows}
    precisions = list(dict.fromkeys(r.precision for r in rows))
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    labels = list(dict.fromkeys(r.label for r in rows))
    model = build_model(spec)

    def cell(r: StepTiming | None, fmt: str) -> str:
        if r is None:
            return "–"
        return format(r.warmup_s, ".1f") if fmt != "ips" else format(r.images_per_s, ".1f" if r.images_per_s >= 1 else ".3g")

    lines = [
        f"## `just bench step` — {spec_path} — {device_name(dev)}, {' / '.join(precisions)}",
        "",
        f"Device: {device_name(dev)}; precision (autocast): {', '.join(precisions)}; torch {torch.__version__}; "
        f"batch {batch}; {spec.data.channels}x{spec.data.resolution}x{spec.data.resolution}; arch {spec.net.arch}; "
        f"{num_params(model) / 1e6:.2f} M parameters; best of the timed rounds, after warm-up "
        "(warm-up includes compilation, or a compile-cache hit).",
        "",
        "| objective | precision | eager img/s | compiled img/s | compiled / eager | vs fp32 (compiled, else eager) | warm-up eager / compiled (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    best = modes[-1]
    for label in labels:
        for p in precisions:
            e, c = by.get((label, p, "eager")), by.get((label, p, "compiled"))
            vs = _ratio(by.get((label, p, best)), by.get((label, "fp32", best)), speed=True)
            lines.append(f"| {label} | {p} | {cell(e, 'ips')} | {cell(c, 'ips')} | {_ratio(c, e, speed=True)} | {vs} | "
                         f"{cell(e, 'warm')} / {cell(c, 'warm')} |")
    name = {"sct": "sCT", "scd": "sCD", "discrete": "discrete-time sCM", "ict": "iCT"}[consistency_kind(spec)]
    lines += ["", f"| consistency step | mode | precision | {name} step time / diffusion step time |", "|---|---|---|---:|"]
    for label in labels[:-1]:
        for mode in modes:
            for p in precisions:
                lines.append(f"| {label} | {mode} | {p} | {_ratio(by.get((label, p, mode)), by.get(('diffusion', p, mode)), speed=False)} |")
    lines += ["", "(The paper's sCD step costs about 2x a diffusion step; the arithmetic floor is about 1.33x.)", ""]
    reads = [r for r in rows if r.host_read_ms is not None]
    if reads:
        lines += ["| step | mode | precision | ms / step, update decided on the device | ms / step, decided on the host (a sync per step) | cost of the sync |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r.label} | {r.mode} | {r.precision} | {r.ms_per_step:.2f} | {r.host_read_ms:.2f} | "
                  f"{r.host_read_ms / r.ms_per_step - 1:+.1%} |" for r in reads]
        lines.append("")
    return "\n".join(lines)


def _bench_spec(path: str) -> Spec:
    spec = read_spec_file(path)
    d = spec.data
    if not d.resolution or not d.channels:  # shape from the spec's data set, without needing its shards
        shapes = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "imagenet64": (3, 64, 1000), "imagenet512-sdvae": (4, 64, 1000)}
        if d.name not in shapes:
            raise UserError(f"--spec {path}: set data.resolution and data.channels to benchmark without shards")
        c, r, k = shapes[d.name]
        d = dataclasses.replace(d, channels=c, resolution=r, num_classes=k)
    spec = dataclasses.replace(spec, data=d)
    validate(spec)
    return spec


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.bench step", description="Images/s of the sCT and diffusion train steps, eager and compiled, side by side.")
    p.add_argument("--spec", default="specs/digits_sct.py", help="spec whose network to use")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the spec's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of --steps steps; the fastest counts")
    p.add_argument("--precision", nargs="+", choices=list(AMP_DTYPES), default=None,
                   help="autocast precision(s) of the step, e.g. fp32 bf16 (default: the spec's train.precision)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="eager and/or compiled")
    p.add_argument("--fused-pass", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                   help="objective.fused_pass of the consistency step, one row each (e.g. on off)")
    p.add_argument("--host-read", action="store_true", help="also time the step deciding its update on the host (a sync per step)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="append the markdown table to this file (e.g. docs/bench_step.md)")
    a = p.parse_args(argv)
    for flag, v, least in (("--batch", a.batch, 0), ("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--rounds", a.rounds, 1)):
        if v < least:
            raise UserError(f"{flag} must be at least {least}, not {v}")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    spec = _bench_spec(a.spec)
    batch = a.batch or spec.train.batch
    dev = pick_device(a.device)
    precisions = tuple(dict.fromkeys(a.precision or [spec.train.precision]))
    print(f"bench step: {a.spec}, batch {batch}, {device_name(dev)}, {' / '.join(precisions)}", flush=True)
    rows = bench_step(spec, batch, a.steps, a.warmup, dev, a.rounds, precisions, tuple(a.modes),
                      tuple(dict.fromkeys(a.fused_pass)), a.host_read)
    table = step_table(rows, a.spec, spec, batch, dev)
    print(table)
    if a.out:
        append_table(a.out, table)
