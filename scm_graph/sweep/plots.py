"""The sweep's plots: each evaluation key, the loss and the gradient norm against training images, one colour
per variant: the mean over its seeds bold, each seed faint.

The mean at an image count is over the seeds that logged it (a seed still running contributes what it has);
the faint lines show each seed as logged. matplotlib is imported when the first plot is drawn (its object API
with the Agg canvas, no pyplot state), as in scm_graph.report.plots.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scm_graph.paths import write_atomic
from scm_graph.sweep.stats import RunResult, eval_keys

PLOTS = "plots"  # the plots' folder inside the sweep folder
STEP_KEYS = [("loss", "loss (weighted objective)"), ("grad_norm", "gradient norm")]


@dataclass(frozen=True)
class Curve:
    variant: str
    seeds: dict[int, tuple[list[int], list[float | None]]]
    """seed -> (images, values) as logged."""
    mean: tuple[list[int], list[float]]
    """(images, mean over the seeds that logged that count)."""


def _points(r: RunResult, key: str, source: str) -> tuple[list[int], list[float | None]]:
    if r.log is None:
        return [], []
    recs = r.log.event("eval") if source == "eval" else r.log.steps
    recs = [e for e in recs if key in e]
    return [e["images"] for e in recs], [e[key] for e in recs]


def curves(results: Sequence[RunResult], key: str, source: str) -> list[Curve]:
    """One curve per variant with data for `key`, from the "eval" events (`source` 'eval') or the metrics lines."""
    out = []
    for v in dict.fromkeys(r.variant for r in results):
        seeds = {r.seed: _points(r, key, source) for r in results if r.variant == v}
        seeds = {s: p for s, p in seeds.items() if p[0]}
        if not seeds:
            continue
        at: dict[int, list[float]] = {}
        for xs, ys in seeds.values():
            for x, y in zip(xs, ys):
                if y is not None and math.isfinite(y):
                    at.setdefault(x, []).append(y)
        xs = sorted(at)
        out.append(Curve(v, seeds, (xs, [sum(at[x]) / len(at[x]) for x in xs])))  # mean over the seeds at x
    return out


def _yscale(cs: list[Curve]) -> str:
    """log where every value is positive and they span more than a decade, else linear."""
    ys = [y for c in cs for _, vals in c.seeds.values() for y in vals if y is not None and math.isfinite(y)]
    return "log" if ys and min(ys) > 0 and max(ys) > 10 * min(ys) else "linear"


def draw(cs: list[Curve], ylabel: str, title: str, path: Path) -> None:
    """One PNG: per variant the seeds faint and their mean bold (atomically written)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, c in enumerate(cs):
        color = f"C{i % 10}"
        for xs, ys in c.seeds.values():
            ax.plot(xs, [math.nan if y is None else y for y in ys], color=color, alpha=0.3, linewidth=0.8)
        mx, my = c.mean
        ax.plot(mx, my, color=color, linewidth=2, label=f"{c.variant} ({len(c.seeds)} seed{'s' * (len(c.seeds) > 1)})",
                marker="o" if len(mx) < 40 else None, markersize=3)
    ax.set_yscale(_yscale(cs))
    ax.set_xlabel("training images")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def write_plots(results: Sequence[RunResult], folder: Path) -> list[Path]:
    """Every plot with data into folder/plots/; their paths relative to `folder`."""
    (folder / PLOTS).mkdir(parents=True, exist_ok=True)
    wanted = [(k, "eval", k, f"{k}: the evaluations of the EMA's samples during training") for k in eval_keys(results)]
    wanted += [(k, "steps", label, label) for k, label in STEP_KEYS]
    made = []
    for key, source, ylabel, title in wanted:
        cs = curves(results, key, source)
        if cs:
            rel = Path(PLOTS) / f"{key}.png"
            draw(cs, ylabel, title, folder / rel)
            made.append(rel)
    return made
