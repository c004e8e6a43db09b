"""`python -m scm_graph.bench step [--spec specs/digits_sct.py] [--batch 128] [--precision fp32 bf16]` (or `just bench step`).

Images/s of the sCT and diffusion train steps, eager and compiled, at each asked precision
(fp32 / bf16 / fp16 autocast), side by side in one process on the same synthetic batch, with the
network of the given spec (any arch: it is built by `build_model`). Prints a markdown table naming the
device and precisions and (with --out) appends it to a file under docs/.
`--fused-pass on off` times the consistency step both ways (`objective.fused_pass`); `--host-read` also times
each step with its update decided on the host (`TrainStep.device_skip` off: one host sync per step, the CPU's way).
`--all` (or several `--spec`s) gives one table of every spec's own step against its network's diffusion step
(`bench.step_specs`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scm_graph.bench import step_specs
from scm_graph.bench.common import append_table, device_name
from scm_graph.bench.step_timing import StepTiming, bench_spec, time_step
from scm_graph.device import pick_device
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.model import build_model, num_params
from scm_graph.paths import output_file
from scm_graph.precision import AMP_DTYPES
from scm_graph.spec import Spec

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
        (f"Device: {device_name(dev)}; precision (autocast): {', '.join(precisions)}; torch {torch.__version__}; "
         f"batch {batch}; {spec.data.channels}x{spec.data.resolution}x{spec.data.resolution}; arch {spec.net.arch}; "
         f"{num_params(model) / 1e6:.2f} M parameters; best of the timed rounds, after warm-up "
         "(warm-up includes compilation, or a compile-cache hit)."),
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


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.bench step", description="Images/s of the sCT and diffusion train steps, eager and compiled, side by side.")
    p.add_argument("--spec", nargs="+", action="extend", default=None,
                   help="spec whose network to use (default specs/digits_sct.py); several give one table of every spec's own step (as --all)")
    p.add_argument("--all", action="store_true", help="every spec in specs/: one table of each one's own step against "
                   "the diffusion step of its network")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the spec's; with --all or several specs, at most --max-batch)")
    p.add_argument("--max-batch", type=int, default=128, help="with --all or several specs: the largest default batch")
    p.add_argument("--max-params", type=float, default=0, help="with --all or several specs: list networks over this "
                   "many million parameters without timing them (0: time all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of --steps steps; the fastest counts")
    p.add_argument("--precision", nargs="+", choices=list(AMP_DTYPES), default=None,
                   help="autocast precision(s) of the step, e.g. fp32 bf16 (default: the spec's train.precision; with --all or several specs, fp32)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="eager and/or compiled")
    p.add_argument("--fused-pass", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                   help="objective.fused_pass of the consistency step, one row each (e.g. on off)")
    p.add_argument("--host-read", action="store_true", help="also time the step deciding its update on the host (a sync per step)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="append the markdown table to this file (e.g. docs/bench_step.md)")
    a = p.parse_args(argv)
    for flag, v, least in (("--batch", a.batch, 0), ("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--rounds", a.rounds, 1),
                           ("--max-batch", a.max_batch, 1), ("--max-params", a.max_params, 0)):
        if v < least:
            raise UserError(f"{flag} must be at least {least}, not {v}")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    if a.all and a.spec:
        raise UserError("--all times every spec in specs/: give it or --spec, not both")
    given: list[str] = []
    for x in a.spec or ["specs/digits_sct.py"]:  # each spec once, however its path is written
        if all(Path(x).resolve() != Path(g).resolve() for g in given):
            given.append(x)
    if (a.all or len(given) > 1) and (a.fused_pass != ["auto"] or a.host_read):
        raise UserError("--fused-pass and --host-read time one spec's step; with --all or several specs they do not apply")
    dev = pick_device(a.device)
    if a.all or len(given) > 1:
        paths = step_specs.shipped_specs() if a.all else given
        if not paths:
            raise UserError(f"--all: no spec files in {step_specs.SPEC_DIR}/ (run from the repository root)")
        if not a.all:
            for path in paths:  # a spec asked for by name must be benchmarkable: its one-line error before any timing
                bench_spec(path)
        precisions = tuple(dict.fromkeys(a.precision or ["fp32"]))
        print(f"bench step: {len(paths)} specs, {device_name(dev)}, {' / '.join(precisions)}", flush=True)
        timer = step_specs.Timer(dev, a.steps, a.warmup, a.rounds)
        spec_rows = step_specs.bench_specs(paths, a.batch, a.max_batch, timer, precisions, tuple(a.modes), a.max_params * 1e6)
        table = step_specs.specs_table(spec_rows, dev, a.steps, a.rounds)
        print(table)
        if a.out:
            append_table(a.out, table)
        return
    spec = bench_spec(given[0])
    batch = a.batch or spec.train.batch
    precisions = tuple(dict.fromkeys(a.precision or [spec.train.precision]))
    print(f"bench step: {given[0]}, batch {batch}, {device_name(dev)}, {' / '.join(precisions)}", flush=True)
    rows = bench_step(spec, batch, a.steps, a.warmup, dev, a.rounds, precisions, tuple(a.modes),
                      tuple(dict.fromkeys(a.fused_pass)), a.host_read)
    table = step_table(rows, given[0], spec, batch, dev)
    print(table)
    if a.out:
        append_table(a.out, table)
