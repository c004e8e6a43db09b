"""The numbers of a sweep: per run its last evaluation, wall time and stability counts; per variant their mean
and spread over the seeds. Torch-free: it reads the run folders' metrics.jsonl only.

Evaluation keys are discovered from the runs' "eval" events (fd_1step, fd_2step for consistency runs on the
digits, fd_heun32 for diffusion, fid_* and fd_dinov2_* where train.eval_metrics asks for them). A variant's
value is the mean over its finished seeds of each run's last evaluation (the one at the budget) ± their sample
standard deviation (n - 1 in the denominator; none for a single seed). Wall time is the run's own `wall_s`
(training time summed over resumes, as the checkpoint carries it), averaged the same way.

Spikes. A logged value v_i of a metrics line (`loss`, `grad_norm`) is a spike when it is more than
SPIKE_FACTOR = 5 times the median m_i of all the run's earlier logged values of that key. For a positive median
that is v_i > 5 m_i; written as v_i - m_i > 4 |m_i|, the rule also covers the adaptive-weighted loss
e^w l - w, which goes negative (about -3.3 on the digits): there a spike is a rise of more than four times the
median's magnitude. The first value is not judged; nulls (an interval whose every step was skipped) are neither
judged nor part of a median. A metrics line averages train.log_every_images images, so a one-step spike shows
diluted and the counts compare runs logged at the same interval. `nonfinite` (samples masked for a non-finite
tangent or prediction) and `skipped` (optimiser steps not applied) are summed over the run's metrics lines; each
line counts the steps since the one before, and a resume truncates the log to its checkpoint and carries the
meter, so nothing is counted twice. A variant's stability counts are summed over all its runs that logged,
finished or not: a run that stopped on non-finite values is the instability being measured.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from scm_graph.report.runs import RunLog
from scm_graph.sweep.state import RunState
from scm_graph.sweep.sweepfile import RunPlan

SPIKE_FACTOR = 5.0


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None
    """Sample standard deviation; None for one value."""
    n: int


@dataclass(frozen=True)
class RunResult:
    variant: str
    seed: int
    status: str
    """'done' (reached the budget), 'stopped' (logged, short of it) or 'not started'."""
    images: int
    wall_s: float | None
    evals: dict[str, float]
    """The last evaluation's values by key."""
    loss_spikes: int = 0
    grad_spikes: int = 0
    nonfinite: int = 0
    skipped: int = 0
    log: RunLog | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass(frozen=True)
class VariantRow:
    variant: str
    seeds: tuple[int, ...]
    done: tuple[int, ...]
    """The seeds whose run reached the budget (the evaluation and wall-time statistics are over these)."""
    evals: dict[str, Stat]
    wall_s: Stat | None
    loss_spikes: int
    grad_spikes: int
    nonfinite: int
    skipped: int


def count_spikes(values: Iterable[float | None], factor: float = SPIKE_FACTOR) -> int:
    """How many values exceed `factor` times the median of the finite values before them (see the module's rule)."""
    seen: list[float] = []  # the earlier finite values, sorted
    n = 0
    for v in values:
        if v is None or not math.isfinite(v):
            continue
        if seen:
            k = len(seen)
            m = seen[k // 2] if k % 2 else (seen[k // 2 - 1] + seen[k // 2]) / 2  # the running median
            n += v - m > (factor - 1) * abs(m)  # v > factor * m when m > 0
        bisect.insort(seen, v)
    return n


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation (sqrt(sum (x - mean)^2 / (n - 1)); None for n = 1)."""
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_result(run: RunPlan, state: RunState) -> RunResult:
    """One run's numbers from its folder's log."""
    log = state.log
    if log is None or not (log.steps or log.events):
        return RunResult(run.variant, run.seed, "not started", 0, None, {})
    evals = log.event("eval")
    last = {k: float(v) for k, v in evals[-1].items() if k != "images" and _number(v)} if evals else {}
    wall = next((r["wall_s"] for r in reversed(log.steps) if _number(r.get("wall_s"))), None)
    return RunResult(
        run.variant, run.seed, "done" if state.status == "done" else "stopped", state.images, wall, last,
        loss_spikes=count_spikes(r.get("loss") for r in log.steps),
        grad_spikes=count_spikes(r.get("grad_norm") for r in log.steps),
        nonfinite=sum(int(r.get("nonfinite") or 0) for r in log.steps),
        skipped=sum(int(r.get("skipped") or 0) for r in log.steps),
        log=log,
    )


def eval_keys(results: Iterable[RunResult]) -> list[str]:
    """Every evaluation key of the runs, in first-seen order."""
    return list(dict.fromkeys(k for r in results for k in r.evals))


def variant_rows(results: Sequence[RunResult]) -> list[VariantRow]:
    """One row per variant, in the order the variants first appear."""
    rows = []
    for v in dict.fromkeys(r.variant for r in results):
        mine = [r for r in results if r.variant == v]
        done = [r for r in mine if r.status == "done"]
        evals = {k: mean_std([r.evals[k] for r in done if k in r.evals]) for k in eval_keys(done)}
        walls = [r.wall_s for r in done if r.wall_s is not None]
        rows.append(VariantRow(
            v, tuple(r.seed for r in mine), tuple(r.seed for r in done), evals, mean_std(walls) if walls else None,
            sum(r.loss_spikes for r in mine), sum(r.grad_spikes for r in mine),
            sum(r.nonfinite for r in mine), sum(r.skipped for r in mine),
        ))
    return rows
