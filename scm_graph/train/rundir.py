"""The run folder: what a training run keeps on disk and the housekeeping around it.

    runs/NAME/ckpt.safetensors                     the newest checkpoint (what --resume reads)
    runs/NAME/checkpoints/ckpt-<images>.safetensors the newest train.keep_last, when keep_last > 1
    runs/NAME/metrics.jsonl                        one JSON record per line (metrics, events)
    runs/NAME/metrics.jsonl.stale                  the log of the last attempt that died before its first checkpoint
    runs/NAME/best.safetensors                     train.keep_best: the full state with the lowest evaluation so far
    runs/NAME/best.safetensors.stale               the best of an attempt that died before its first checkpoint
    runs/NAME/grids/grid-<images>.png              sample grids

Leftovers of killed processes (temp files of checkpoint, metrics and grid writes whose process is gone)
are removed when the next run starts in the folder, and the run says so once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from scm_graph.checkpoint import remove_stale_temps
from scm_graph.errors import UserError
from scm_graph.paths import output_dir, remove_dead_temps, write_atomic

CKPT = "ckpt.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
STALE = METRICS + ".stale"
KEPT = "checkpoints"
_KEPT_NAME = re.compile(r"ckpt-\d{12}\.safetensors")


def prepare(out: Path, resume: bool) -> list[str]:
    """Check the folder for a fresh run or a resume, create it, tidy leftovers; returns notes to print once."""
    ckpt = out / CKPT
    if resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint {ckpt}")
    if not resume and ckpt.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --train.out to start elsewhere")
    output_dir(out, "--train.out")
    removed = remove_stale_temps(ckpt) + remove_stale_temps(out / BEST)
    for folder in (out, out / "grids", out / KEPT):
        removed += remove_dead_temps(folder)
    legacy = sorted(out.glob(f"{METRICS}.stale-*"))  # earlier versions kept one per failed start
    for p in legacy:
        p.unlink()
    notes = []
    if removed or legacy:
        notes.append(f"tidied {out}: removed {len(removed)} temp file(s) left by killed runs"
                     + (f" and {len(legacy)} old stale log(s)" if legacy else ""))
    if not resume and (out / METRICS).exists():  # a run that died before its first checkpoint
        os.replace(out / METRICS, out / STALE)
        notes.append(f"{out / METRICS} of an attempt without a checkpoint was moved to {out / STALE}")
    if not resume and (out / BEST).exists():  # its best, likewise: never another run's weights under this run's name
        os.replace(out / BEST, out / (BEST + ".stale"))
        notes.append(f"{out / BEST} of an attempt without a checkpoint was moved to {out / (BEST + '.stale')}")
    return notes


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file such as metrics.jsonl (a line torn by a kill is skipped)."""
    if not path.exists():
        return []
    recs = []
    for ln in path.read_text().splitlines():
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return recs


def truncate_metrics(path: Path, images: int) -> None:
    """Drop metric lines written after the checkpoint (a crash between checkpoints), atomically."""
    if not path.exists():
        return
    keep = [json.dumps(r) for r in read_records(path) if r.get("images", 0) <= images]
    text = "".join(ln + "\n" for ln in keep).encode()
    write_atomic(path, lambda f: f.write(text))


def keep_copy(out: Path, images: int, keep_last: int) -> None:
    """With keep_last K > 1: the newest checkpoint also as checkpoints/ckpt-<images>, only the K newest kept."""
    if keep_last <= 1:
        return
    folder = out / KEPT
    folder.mkdir(exist_ok=True)
    dest = folder / f"ckpt-{images:012d}.safetensors"
    tmp = folder / f".{dest.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / CKPT, tmp)  # the same file, no extra space
    except OSError:
        shutil.copyfile(out / CKPT, tmp)  # a file system without hard links
    os.replace(tmp, dest)
    kept = sorted(p for p in folder.iterdir() if _KEPT_NAME.fullmatch(p.name))
    for old in kept[:-keep_last]:
        old.unlink()
