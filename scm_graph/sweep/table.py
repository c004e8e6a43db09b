"""sweep.md: one row per variant (mean ± std over seeds), one row per run, the variants' arguments and the plots.

Markdown, so it reads as text in a terminal and renders on a code host; the plots are linked by relative path.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from scm_graph.paths import write_atomic
from scm_graph.sweep.stats import SPIKE_FACTOR, RunResult, Stat, VariantRow, eval_keys
from scm_graph.sweep.sweepfile import Sweep

SWEEP_MD = "sweep.md"
DASH = "–"


def fmt(v: float) -> str:
    return f"{v:.4g}"


def fmt_stat(s: Stat | None) -> str:
    """`mean ± std`, the std to two significant digits and the mean to the same decimal place."""
    if s is None:
        return DASH
    if s.std is None or s.std == 0 or not math.isfinite(s.std):
        return fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {s.std:g}"
    dec = min(6, max(0, 1 - math.floor(math.log10(s.std))))  # two significant digits of the std
    return f"{s.mean:.{dec}f} ± {s.std:.{dec}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _seeds(row: VariantRow) -> str:
    done = ", ".join(map(str, row.done)) or "none"
    return done if row.done == row.seeds else f"{done} (of {', '.join(map(str, row.seeds))})"


def _variants(sweep: Sweep) -> list[str]:
    """Each variant's spec file and overrides, after the arguments every variant shares."""
    lines = [f"- every variant: `{shlex.join(sweep.args)}`"] if sweep.args else []
    for name, args in sweep.variants.items():
        full = list(args) if args and not args[0].startswith("-") else [sweep.base, *args]
        lines.append(f"- `{name}`: `{shlex.join(full)}`")
    return lines


def render(sweep: Sweep, source: str, results: Sequence[RunResult], rows: Sequence[VariantRow],
           plots: Sequence[Path]) -> str:
    """The page's text; `plots` are relative to the sweep folder."""
    keys = eval_keys(results)
    stab = ["loss spikes", "grad-norm spikes", "non-finite", "skipped"]
    done = sum(r.status == "done" for r in results)
    lines = [
        f"# Sweep `{source}`",
        "",
        (f"Image budget: {sweep.images:,} training images per run. Seeds: {', '.join(map(str, sweep.seeds))}. "
         f"Runs: {len(results)}, {done} finished."),
        "",
        *_table(["variant", "seeds", *keys, "wall s", *stab],
                [[r.variant, _seeds(r), *(fmt_stat(r.evals.get(k)) for k in keys), fmt_stat(r.wall_s),
                  str(r.loss_spikes), str(r.grad_spikes), str(r.nonfinite), str(r.skipped)] for r in rows]),
        "",
        (f"Evaluations ({', '.join(keys) or 'none logged'}) and wall time: mean ± sample standard deviation over the "
         "finished seeds of each run's last evaluation, at the budget. "
         f"A spike is a logged loss or gradient norm more than {SPIKE_FACTOR:g}x the median of the run's earlier "
         "logged values (for the negative adaptive-weighted loss: a rise of more than 4x the median's magnitude). "
         "Non-finite: samples masked for a non-finite tangent or prediction; skipped: optimiser steps not applied. "
         "Spikes, non-finite and skipped are summed over the variant's runs, finished or not "
         "(definitions: `docs/sweep.md`)."),
        "",
        "## Runs",
        "",
        *_table(["run", "status", "images", "wall s", *keys, *stab],
                [[r.name, r.status, f"{r.images:,}", DASH if r.wall_s is None else f"{r.wall_s:.0f}",
                  *(fmt(r.evals[k]) if k in r.evals else DASH for k in keys),
                  str(r.loss_spikes), str(r.grad_spikes), str(r.nonfinite), str(r.skipped)] for r in results]),
        "",
        "## Variants",
        "",
        (f"Each run: `python -m scm_graph.train SPEC.py [every variant's] [the variant's] --train.total_images "
         f"{sweep.images} --train.seed SEED --train.out <sweep folder>/VARIANT-sSEED`."),
        "",
        *_variants(sweep),
    ]
    if plots:
        lines += ["", "## Plots", "", "Mean over seeds (bold) and each seed (faint), against training images.", ""]
        lines += [f"![{p.stem}]({p.as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def write(folder: Path, text: str) -> Path:
    """Write sweep.md into the sweep folder (atomically)."""
    path = folder / SWEEP_MD
    data = text.encode()
    write_atomic(path, lambda f: f.write(data))
    return path
