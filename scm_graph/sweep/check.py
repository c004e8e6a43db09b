"""The up-front check of a sweep: every run's spec is built before the first run starts.

Each run's arguments go through the train CLI's own `parse_args` (scm_graph.train.cli): the spec file, the
overrides (tyro), `spec.validate`, the shards' manifest, the network and, for sCD, the teacher. So an override a
spec rejects stops the sweep with the train CLI's one line (prefixed with the run's name) before any training,
and a run that passes here passes the same check when its own process starts. A run folder that already holds
a run must hold this one: its checkpoint's spec (or, without a checkpoint, the start event's) may differ from
the run's only in the fields `--resume` may change (scm_graph.train.loop.RESUMABLE), so an edited sweep file
never resumes, or reports, a run of another spec under a variant's name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from scm_graph.checkpoint import read_metadata
from scm_graph.errors import UserError
from scm_graph.spec import Spec, spec_from_json
from scm_graph.sweep.state import CKPT, RunState
from scm_graph.sweep.sweepfile import RunPlan
from scm_graph.train.cli import parse_args
from scm_graph.train.loop import check_resumable


def resolved_spec(run: RunPlan) -> Spec:
    """The run's resolved, checked spec, exactly as `python -m scm_graph.train` builds it."""
    try:
        return parse_args(run.argv(resume=False)).spec
    except UserError as e:
        raise UserError(f"{run.name}: {e}") from None


def _saved(run: RunPlan, state: RunState) -> tuple[Spec, Path, int | None] | None:
    """The spec the folder's run was trained with, where it was read, and the checkpoint's image count: the
    checkpoint's, else (a finished run without one) its log's start event's; None when nothing was trained."""
    ckpt = run.folder / CKPT
    if ckpt.is_file():
        md = read_metadata(ckpt, verify="--ignore-checksum" not in run.overrides)
        return spec_from_json(md["spec"]), ckpt, int(md["images"])
    start = state.log.event("start") if state.log is not None else []
    if state.status == "done" and start and isinstance(start[0].get("spec"), dict):
        return spec_from_json(json.dumps(start[0]["spec"])), run.folder / "metrics.jsonl", None
    return None


def check_run(run: RunPlan, state: RunState) -> RunState:
    """Check the run's spec, and against what its folder already holds (one-line UserError naming the run); the
    state, with a run to resume at its checkpoint's image count (its log may run past it)."""
    spec = resolved_spec(run)
    saved = _saved(run, state)
    if saved is None:
        return state
    try:
        check_resumable(saved[0], spec, saved[1])
    except UserError as e:
        why = str(e).removeprefix("--resume: ")
        raise UserError(f"{run.name}: {run.folder} holds a run of another spec ({why}); "
                        "delete the folder or give the sweep another --out") from None
    if state.status == "done" and state.images - spec.train.batch >= run.images:  # one step beyond is the last batch's overshoot
        raise UserError(f"{run.name}: {run.folder} was trained to {state.images} images, beyond the sweep's budget of "
                        f"{run.images}; delete the folder or give the sweep another --out")
    return dataclasses.replace(state, images=saved[2]) if state.status == "resume" and saved[2] is not None else state


def check_runs(runs: list[RunPlan], states: list[RunState]) -> list[RunState]:
    """Every run checked before any run starts; their states (see check_run)."""
    return [check_run(r, s) for r, s in zip(runs, states)]
