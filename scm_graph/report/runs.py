"""A run folder as the report sees it: the records of its metrics.jsonl, split into metrics lines and events.

metrics.jsonl holds one JSON object per line (scm_graph.train.loop): metrics lines (images, step, loss, grad_norm,
mse, tangent_norm, w_min, w_max, mse_by_t, r, lr, img_per_s, wall_s, nonfinite, skipped) and events ("start" with
the spec, "eval" with the eval numbers: fd_*, fid_*, fd_dinov2_*, "end"). A last line torn by a killed run is skipped, as the loop skips it
(and a resume rewrites the file without it); a bad line anywhere else means the file is not a metrics log.
The file names are the run folder's (scm_graph.train.rundir); they are spelled here so the report stays torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from scm_graph.errors import UserError

METRICS = "metrics.jsonl"  # scm_graph.train.rundir.METRICS
GRIDS = "grids"  # grids/grid-<images>.png (scm_graph.train.loop.Run.grid_path)
_GRID = re.compile(r"grid-(\d+)\.png")


@dataclass
class RunLog:
    folder: Path
    label: str  # the name in legends and file names: the folder's name, made unique over the runs
    steps: list[dict] = field(default_factory=list)  # metrics lines, in file order
    events: list[dict] = field(default_factory=list)

    def event(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]

    @property
    def spec_name(self) -> str:
        start = self.event("start")
        spec = start[0].get("spec") if start else None
        return str(spec.get("name", "?")) if isinstance(spec, dict) else "?"

    @property
    def eval_keys(self) -> list[str]:
        """The eval metrics the run logged (fd_1step, fd_2step, fd_heun32, ...), in first-seen order."""
        keys: dict[str, None] = {}
        for e in self.event("eval"):
            keys.update({k: None for k, v in e.items() if k not in ("event", "images") and _number(v)})
        return list(keys)

    def latest_grid(self) -> tuple[int, Path] | None:
        """(images, path) of the newest grids/grid-<images>.png, if any."""
        found = []
        if (self.folder / GRIDS).is_dir():
            found = [(int(m.group(1)), p) for p in (self.folder / GRIDS).iterdir()
                     if (m := _GRID.fullmatch(p.name)) and p.is_file()]
        return max(found) if found else None


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_lines(data: bytes, where: str) -> list[dict]:
    """The JSON objects of a JSONL file's bytes; a torn last line is skipped, any other bad line is a UserError."""
    lines = [(i + 1, ln) for i, ln in enumerate(data.split(b"\n")) if ln.strip()]
    recs = []
    for k, (no, ln) in enumerate(lines):
        try:
            rec = json.loads(ln.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if k == len(lines) - 1:
                continue  # torn by a kill mid-write
            raise UserError(f"{where}: line {no} is not JSON; not a metrics log") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: line {no} is not a JSON object; not a metrics log")
        recs.append(rec)
    return recs


def load_run(folder: str | Path, label: str) -> RunLog:
    """Read one run folder (one-line UserError: not a run folder, an unreadable log, no metrics line yet)."""
    folder = Path(folder)
    path = folder / METRICS
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not path.is_file():
        raise UserError(f"{folder} is not a run folder (it has no {METRICS})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    run = RunLog(folder, label)
    for rec in parse_lines(data, str(path)):
        if "event" in rec:
            if _number(rec.get("images")):
                run.events.append(rec)
        elif "loss" in rec:
            if not _number(rec.get("images")):
                raise UserError(f"{path}: a metrics line without an image count; not a metrics log")
            run.steps.append(rec)
    if not run.steps:
        raise UserError(f"{path}: no metrics line yet (the run logs one every train.log_every_images)")
    return run


def labels(folders: list[Path]) -> list[str]:
    """Unique names for the runs: the folder's name, with its parent's where two share it, numbered if need be."""
    names = [f.resolve().name or "run" for f in folders]
    names = [f"{f.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names)]
    return [f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
