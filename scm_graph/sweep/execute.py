"""Running a sweep's runs, one after another, each as its own `python -m scm_graph.train` process.

Why a process per run rather than `train()` in this one: each run then starts as the same command typed by
hand would (the command is printed), with fresh global state (default dtype, RNG, threads, environment);
torch.compile's caches and recompile limits are per process, so the tenth variant is not compiled against the
guards of nine others; the memory a run held (the CUDA allocator's pool, data workers) goes back to the system
when it ends; and a crash (a segfault in a kernel, an out-of-memory kill) ends that run only: the sweep reports
it and goes on to the next. The price is about two seconds of imports per run.

A finished run is skipped, a started one continued with `--resume`, a new one started (scm_graph.sweep.state).
The training prints its own progress; the sweep prints one line as each run starts and ends. Ctrl-C stops the
running training (which keeps its last checkpoint) and the sweep; the next invocation continues from there.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from scm_graph.sweep.state import RunState
from scm_graph.sweep.sweepfile import RunPlan

INTERRUPTED = 130  # the exit status of a CLI stopped by Ctrl-C (scm_graph.errors.cli_main)


@dataclass(frozen=True)
class Failure:
    run: str
    returncode: int


def command(run: RunPlan, state: RunState) -> list[str]:
    """The train command for `run`, with --resume when its folder holds a started run."""
    return [sys.executable, "-m", "scm_graph.train", *run.argv(resume=state.status == "resume")]


def shown(cmd: list[str]) -> str:
    """The command as one would type it: `python -m scm_graph.train ...`."""
    return shlex.join(["python", *cmd[1:]])


def _train(cmd: list[str]) -> int:
    """Run one training process to its end; its exit status (Ctrl-C: wait for it to stop, then re-raise)."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=60)  # it got the same SIGINT: let it say so and exit on its own
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def execute(runs: list[RunPlan], states: list[RunState]) -> list[Failure]:
    """Train every unfinished run in order; the runs that failed (the sweep goes on past them)."""
    failures = []
    n = len(runs)
    for i, (run, state) in enumerate(zip(runs, states), 1):
        tag = f"[{i}/{n}] {run.name}"
        if state.status == "done":
            print(f"{tag}: finished ({state.images} images), skipped", flush=True)
            continue
        cmd = command(run, state)
        how = f"resuming at {state.images} images" if state.status == "resume" else "starting"
        print(f"{tag}: {how}, {run.images} images: {shown(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = _train(cmd)
        took = time.perf_counter() - t0
        if rc == INTERRUPTED:
            raise KeyboardInterrupt
        if rc == 0:
            print(f"{tag}: done in {took:.0f} s", flush=True)
        else:
            failures.append(Failure(run.name, rc))
            print(f"{tag}: failed (exit {rc}) after {took:.0f} s; going on with the next run", flush=True)
    return failures
