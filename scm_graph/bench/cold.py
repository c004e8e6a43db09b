"""`python -m scm_graph.bench cold [--spec specs/digits_sct.py] [--runs 3] [--kind sct diffusion]` (or `just bench cold`).

The cold start: how long a fresh install waits for its first compiled train step, and where that time goes.
Each run is a child Python of its own with empty compile caches (a new `TORCHINDUCTOR_CACHE_DIR` and
`TRITON_CACHE_DIR`). It builds the spec's step on a synthetic batch as `bench step` does, times the first call (the
compilation and one step), then the step time, and reads the compile phases from `torch._dynamo.utils.compile_times`.
The runs go one after another (a cold start is CPU-bound: two at once would time each other); each cache folder is
removed after its run. Prints a markdown table; `--out` appends it to a file under docs/.

Inductor's precompiled C++ header lives in the temp folder's `torchinductor_<user>`, outside its cache folder, and is
built once per machine (about 5 s on the 2-core box). `--new-machine` gives each child a fresh temp folder too, so it
pays for the header as a first run on a new machine does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from scm_graph.bench.common import append_table, device_name
from scm_graph.bench.step_timing import bench_spec, time_step
from scm_graph.device import pick_device
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_file
from scm_graph.precision import AMP_DTYPES

KINDS = ("sct", "scd", "ict", "diffusion")

# Each phase of `Phases`: (the compile_times entries whose sums add up to it, the entries to subtract). Dynamo's frame
# compile holds the backend call; the backend call holds AOTAutograd and the forward graph's Inductor compile; the
# backward graph is compiled at the first backward call; code generation ends before the wait for the compilers starts.
PHASES = {
    "dynamo_s": (("_compile.compile_inner",), ("OutputGraph.call_user_compiler",)),
    "aot_s": (("OutputGraph.call_user_compiler",), ("compile_fx.<locals>.fw_compiler_base",)),
    "inductor_fw_s": (("compile_fx.<locals>.fw_compiler_base",), ()),
    "inductor_bw_s": (("compile_fx.<locals>.bw_compiler",), ()),
    "codegen_s": (("Scheduler.codegen",), ()),
    "wait_s": (("async_compile.wait",), ()),
}


@dataclass(frozen=True)
class Phases:
    """Seconds of a cold start by phase; None where the installed torch does not time it under that name."""

    dynamo_s: float | None = None
    aot_s: float | None = None
    inductor_fw_s: float | None = None
    inductor_bw_s: float | None = None
    codegen_s: float | None = None  # within the two Inductor phases
    wait_s: float | None = None  # within the two Inductor phases

    def rest(self, first_step_s: float) -> float | None:
        """The first step less the four disjoint phases: its own run and what no phase times."""
        known = (self.dynamo_s, self.aot_s, self.inductor_fw_s, self.inductor_bw_s)
        return None if None in known else first_step_s - sum(known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ColdArgs:
    """What a child times: sent to it as JSON."""

    spec: str
    kind: str
    batch: int
    precision: str
    threads: int  # 0: torch's own choice
    steps: int
    rounds: int
    device: str


@dataclass(frozen=True)
class ColdRun:
    """One child's cold start."""

    kind: str
    first_step_s: float
    ms_per_step: float
    phases: Phases
    vec_isa: str  # Inductor's vector ISA for C++ kernels ("scalar" when it found none), or "-" off the CPU
    device: str


def phases_from(names: list[str], values: list[str]) -> Phases:
    """The phases of `PHASES` from `compile_times(repr="csv", aggregate=True)`'s names and summed values."""
    times = dict(zip(names, (float(v) for v in values)))
    found = {phase: sum(times[n] for n in plus) - sum(times[n] for n in minus)
             for phase, (plus, minus) in PHASES.items() if all(n in times for n in plus + minus)}
    return Phases(**found)


def _child(args: ColdArgs) -> None:
    """In the child: one cold start, then a JSON line on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    spec = bench_spec(args.spec)
    r = time_step(spec, args.kind, True, args.batch, args.steps, 1, dev, args.rounds, args.precision)
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    isa = "-"
    if dev.type == "cpu":
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        picked = pick_vec_isa()
        isa = str(picked) if picked else "scalar"  # Inductor's no-ISA object is falsy
    run = ColdRun(args.kind, r.warmup_s, r.ms_per_step, phases_from(names, values), isa, device_name(dev))
    print(json.dumps(dataclasses.asdict(run)), flush=True)


def _run_child(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; past the timeout (TimeoutExpired) or on Ctrl-C, kill the whole session
    (Inductor's compile workers and compilers too, so none still writes into the cache folder being removed)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except BaseException:  # the timeout, or Ctrl-C, whose SIGINT a session of its own does not get
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cold_run(args: ColdArgs, new_machine: bool, timeout_s: float) -> ColdRun:
    """One cold start in a child Python with fresh cache folders, removed afterwards."""
    scratch = tempfile.mkdtemp(prefix="scm_graph_cold_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
           "TRITON_CACHE_DIR": os.path.join(scratch, "triton")}
    if new_machine:
        env["TMPDIR"] = os.path.join(scratch, "tmp")
        os.makedirs(env["TMPDIR"])
    what = f"the {args.kind} cold start of {args.spec}"
    try:
        res = _run_child([sys.executable, "-m", "scm_graph.bench.cold", json.dumps(dataclasses.asdict(args))], env,
                         timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench cold: {what} ran past --timeout {timeout_s:g} s") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise UserError(f"bench cold: {what} failed (exit code {res.returncode}): {last}")
    try:
        out = json.loads(lines[-1])
        return ColdRun(**{**out, "phases": Phases(**out["phases"])})
    except (ValueError, TypeError, KeyError):
        raise UserError(f"bench cold: {what} printed no result line, but: {lines[-1][:200]}") from None


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def cold_table(runs: list[ColdRun], spec_path: str, batch: int, precision: str, new_machine: bool) -> str:
    """The markdown report: one row per run, then each step kind's mean and range."""
    header = (" and a fresh temp folder, so Inductor built its precompiled C++ header as on a new machine" if new_machine else
              "; Inductor's precompiled C++ header, built once per machine outside the cache folder, was already there")
    lines = [
        f"## `just bench cold` — {spec_path}, {runs[0].device}, {precision}, batch {batch}",
        "",
        (f"torch {torch.__version__}. Each run is its own process with empty Inductor and Triton cache folders{header}. "
         "First step: the first call of the compiled train step, compilation included. The phases are "
         "`torch._dynamo.utils.compile_times` sums: Dynamo's tracing, AOTAutograd (joint trace and partition), "
         "Inductor's forward and backward graphs, and within those Inductor's code generation and its wait for the "
         "C++ or Triton compilers. Rest: the first step's own run and everything else."),
        "",
        ("| run | step | first step (s) | Dynamo | AOTAutograd | Inductor, forward | Inductor, backward "
         "| code generation | waiting for compilers | rest | step (ms) | vector ISA |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(runs, 1):
        p = r.phases
        lines.append(f"| {i} | {r.kind} | **{r.first_step_s:.1f}** | {_s(p.dynamo_s)} | {_s(p.aot_s)} "
                     f"| {_s(p.inductor_fw_s)} | {_s(p.inductor_bw_s)} | {_s(p.codegen_s)} | {_s(p.wait_s)} "
                     f"| {_s(p.rest(r.first_step_s))} | {r.ms_per_step:.1f} | {r.vec_isa} |")
    lines.append("")
    for kind in dict.fromkeys(r.kind for r in runs):
        firsts = [r.first_step_s for r in runs if r.kind == kind]
        lines.append(f"- **{kind}**: first step {statistics.mean(firsts):.1f} s, the mean of {len(firsts)} "
                     f"(range {min(firsts):.1f}-{max(firsts):.1f} s).")
    lines.append("")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.bench cold",
                       description="The first compiled train step on empty compile caches, each run in its own process.")
    p.add_argument("--spec", default="specs/digits_sct.py", help="spec whose network and step to use")
    p.add_argument("--kind", nargs="+", choices=KINDS, default=None,
                   help="step(s) to time, e.g. sct diffusion (default: the spec's objective.kind)")
    p.add_argument("--runs", type=int, default=3, help="cold starts per step kind, alternating between kinds (default: 3)")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the spec's)")
    p.add_argument("--precision", choices=list(AMP_DTYPES), default=None, help="default: the spec's train.precision")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (default: torch's own choice)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round after the first (default: 5)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds; the fastest counts (default: 2)")
    p.add_argument("--new-machine", action="store_true", help="also a fresh temp folder per child, so Inductor "
                   "builds its precompiled header as on a new machine")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one child may take (default: 1800)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="append the markdown table to this file (e.g. docs/bench_cold_cpu.md)")
    a = p.parse_args(argv)
    for flag, v, least in (("--runs", a.runs, 1), ("--batch", a.batch, 0), ("--threads", a.threads, 0),
                           ("--steps", a.steps, 1), ("--rounds", a.rounds, 1), ("--timeout", a.timeout, 1)):
        if v < least:
            raise UserError(f"{flag} must be at least {least}, not {v:g}")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    spec = bench_spec(a.spec)  # a bad spec's one-line error before any child starts
    kinds = tuple(dict.fromkeys(a.kind or [spec.objective.kind]))
    if "scd" in kinds and spec.objective.kind != "scd":
        raise UserError(f"--kind scd needs an sCD spec (its teacher and guidance settings); {a.spec} is {spec.objective.kind}")
    pick_device(a.device)  # an unavailable device fails here, not in every child
    batch = a.batch or spec.train.batch
    precision = a.precision or spec.train.precision
    print(f"bench cold: {a.spec}, {' '.join(kinds)}, {a.runs} run(s) each, batch {batch}, {precision}", flush=True)
    runs: list[ColdRun] = []
    total = a.runs * len(kinds)
    for _ in range(a.runs):
        for kind in kinds:  # alternating, so a drift of the machine's speed touches every kind alike
            print(f"  run {len(runs) + 1}/{total}: {kind} ...", flush=True)
            args = ColdArgs(a.spec, kind, batch, precision, a.threads, a.steps, a.rounds, a.device)
            run = cold_run(args, a.new_machine, a.timeout)
            runs.append(run)
            print(f"  run {len(runs)}/{total}: {kind}: first step {run.first_step_s:.1f} s, then "
                  f"{run.ms_per_step:.1f} ms/step (vector ISA: {run.vec_isa})", flush=True)
    table = cold_table(runs, a.spec, batch, precision, a.new_machine)
    print(table)
    if a.out:
        append_table(a.out, table)


if __name__ == "__main__":  # the child of `cold_run` (a JSON argument), else the command line
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        cli_main(_child)(ColdArgs(**json.loads(sys.argv[1])))
    else:
        main(sys.argv[1:])
