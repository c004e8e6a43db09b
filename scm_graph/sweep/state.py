"""Where a sweep's run folder stands: not started, started (resume it), or finished at the budget. Torch-free.

A run has finished when its metrics.jsonl holds an "end" event at the budget or beyond: `train()` logs it last,
after the final metrics line, checkpoint, grid and evaluation (scm_graph.train.loop), so nothing is still due.
An "end" short of the budget is a run stopped by train.time_limit_s; like a killed run, it is resumed. A run
folder with a checkpoint and no such event is continued with `--resume` (train() reproduces the uninterrupted
run exactly); one without a checkpoint starts afresh (train() moves a log without a checkpoint aside as
metrics.jsonl.stale). The file names are the run folder's (scm_graph.train.rundir), spelled here to stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scm_graph.errors import UserError
from scm_graph.report.runs import METRICS, RunLog, parse_lines

CKPT = "ckpt.safetensors"  # scm_graph.train.rundir.CKPT


@dataclass(frozen=True)
class RunState:
    status: Literal["new", "resume", "done"]
    images: int
    """The images of the newest metrics line (0: none yet); for a run to resume, sweep.check sets its checkpoint's."""
    log: RunLog | None
    """The folder's metrics.jsonl, split into metrics lines and events; None without one."""


def read_log(folder: Path, label: str = "") -> RunLog | None:
    """A run folder's metrics.jsonl as a RunLog (metrics lines and events), None if it has none yet; a line
    that is not JSON (other than a last line torn by a kill) is a one-line UserError."""
    path = folder / METRICS
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    log = RunLog(folder, label or folder.name)
    for rec in parse_lines(data, str(path)):
        if "event" in rec:
            log.events.append(rec)
        elif "loss" in rec and isinstance(rec.get("images"), int):
            log.steps.append(rec)
    return log


def finished(log: RunLog | None, budget: int) -> bool:
    """Whether the log holds an "end" event at `budget` images or beyond."""
    return log is not None and any(e.get("images", 0) >= budget for e in log.event("end"))


def run_state(folder: Path, budget: int) -> RunState:
    """The state of the run folder `folder` for an image budget of `budget`."""
    log = read_log(folder)
    images = log.steps[-1]["images"] if log is not None and log.steps else 0
    if finished(log, budget):
        return RunState("done", images, log)
    return RunState("resume" if (folder / CKPT).is_file() else "new", images, log)
