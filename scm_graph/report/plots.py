"""The plots: each quantity of the metrics lines (and each eval metric) over images, the runs overlaid.

A plot is its series, taken from the records unchanged (a null stays null and is drawn as a gap), written
as <name>.json beside <name>.png, so the picture can be checked against metrics.jsonl number for number.
Per-t-bucket loss (`mse_by_t`): one line per bucket, coloured from small t to large, the runs told apart by
line style. Lines rather than an images x bucket heat map, because several runs overlay in one plot, the
values span decades (a log axis shows them; a colour scale hides them), and there are only seven buckets.
matplotlib is imported when the first plot is drawn (its object API with the Agg canvas: no pyplot state).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scm_graph.errors import UserError
from scm_graph.paths import write_atomic
from scm_graph.report.runs import RunLog

# (plot name, metrics-line key, axis label)
SCALARS = [
    ("loss", "loss", "loss (weighted sCM objective)"),
    ("mse", "mse", "mse (unweighted, per sample)"),
    ("grad_norm", "grad_norm", "gradient norm"),
    ("tangent_norm", "tangent_norm", "tangent norm"),
    ("lr", "lr", "learning rate"),
    ("img_per_s", "img_per_s", "images / s"),
]
MARKERS_BELOW = 40  # points per series under which every point gets a marker (short runs: lone points show)


@dataclass
class Series:
    run: str
    key: str  # metrics-line key ("loss"), "mse_by_t/<bucket>", or the eval key ("fd_1step")
    x: list
    y: list


@dataclass
class Plot:
    name: str  # file stem: <name>.png, <name>.json
    title: str
    ylabel: str
    kind: str = "lines"  # "lines", "band" (w_min / w_max pairs), "buckets" (mse_by_t)
    series: list[Series] = field(default_factory=list)

    @property
    def yscale(self) -> str:
        """log where every value is positive and they span more than a decade, else linear."""
        ys = [v for s in self.series for v in s.y if v is not None]
        return "log" if ys and min(ys) > 0 and max(ys) > 10 * min(ys) else "linear"


def _images(run: RunLog) -> list:
    return [r["images"] for r in run.steps]


def _bucket_key(b: str) -> float:
    try:
        return float(b.split("-")[0])
    except ValueError:
        return math.inf


def build(runs: list[RunLog]) -> list[Plot]:
    """Every plot with data in at least one run, in page order."""
    plots = []
    for name, key, label in SCALARS:
        p = Plot(name, label, label)
        p.series = [Series(r.label, key, _images(r), [s.get(key) for s in r.steps])
                    for r in runs if any(s.get(key) is not None for s in r.steps)]
        plots.append(p)
    band = Plot("w_range", "w_phi range over the batch (adaptive weighting's log-variance)", "w_phi", kind="band")
    for r in runs:
        if any(s.get("w_min") is not None for s in r.steps):
            band.series += [Series(r.label, k, _images(r), [s.get(k) for s in r.steps]) for k in ("w_min", "w_max")]
    plots.append(band)
    buckets = Plot("mse_by_t", "per-sample mse by time bucket t", "mse", kind="buckets")
    for r in runs:
        keys = sorted({b for s in r.steps for b in (s.get("mse_by_t") or {})}, key=_bucket_key)
        buckets.series += [Series(r.label, f"mse_by_t/{b}", _images(r), [(s.get("mse_by_t") or {}).get(b) for s in r.steps])
                           for b in keys]
    plots.append(buckets)
    eval_keys = list(dict.fromkeys(k for r in runs for k in r.eval_keys))
    for key in eval_keys:
        p = Plot(f"eval_{key}", f"{key} (evaluation of the EMA's samples)", key)
        for r in runs:
            evs = [e for e in r.event("eval") if key in e]
            if evs:
                p.series.append(Series(r.label, key, [e["images"] for e in evs], [e[key] for e in evs]))
        plots.append(p)
    return [p for p in plots if p.series]


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report draws its plots with matplotlib: pip install matplotlib") from None
    return Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")


def _nan(ys: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in ys]


def draw(plot: Plot, path: Path) -> None:
    """Draw `plot` into the PNG `path` (atomically)."""
    fig = _figure()
    ax = fig.add_subplot()
    runs = list(dict.fromkeys(s.run for s in plot.series))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    if plot.kind == "buckets":
        from matplotlib import colormaps
        from matplotlib.lines import Line2D

        buckets = list(dict.fromkeys(s.key.split("/", 1)[1] for s in plot.series))
        cmap = colormaps["viridis"]
        shade = {b: cmap(i / max(1, len(buckets) - 1)) for i, b in enumerate(sorted(buckets, key=_bucket_key))}
        for s in plot.series:
            b = s.key.split("/", 1)[1]
            ax.plot(s.x, _nan(s.y), color=shade[b], linestyle=styles[runs.index(s.run) % 4],
                    marker="o" if len(s.x) < MARKERS_BELOW else None, markersize=3)
        handles = [Line2D([], [], color=shade[b], label=f"t {b}") for b in sorted(buckets, key=_bucket_key)]
        if len(runs) > 1:
            handles += [Line2D([], [], color="k", linestyle=styles[i % 4], label=r) for i, r in enumerate(runs)]
        ax.legend(handles=handles, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif plot.kind == "band":
        for i, r in enumerate(runs):
            lo, hi = (next(s for s in plot.series if s.run == r and s.key == k) for k in ("w_min", "w_max"))
            ax.fill_between(lo.x, _nan(lo.y), _nan(hi.y), color=colors[i], alpha=0.25, label=f"{r} (min..max)")
            for s in (lo, hi):
                ax.plot(s.x, _nan(s.y), color=colors[i], linewidth=0.8,
                        marker="o" if len(s.x) < MARKERS_BELOW else None, markersize=3)
        ax.legend(fontsize="small")
    else:
        for i, s in enumerate(plot.series):
            ax.plot(s.x, _nan(s.y), color=colors[runs.index(s.run)], label=s.run,
                    marker="o" if len(s.x) < MARKERS_BELOW else None, markersize=3)
        ax.legend(fontsize="small")
    ax.set_yscale(plot.yscale)
    ax.set_xlabel("images")
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def write(plot: Plot, folder: Path) -> Path:
    """<name>.png and <name>.json (the series as plotted) in `folder`; returns the PNG's path."""
    draw(plot, folder / f"{plot.name}.png")
    data = {"name": plot.name, "title": plot.title, "x": "images", "y": plot.ylabel, "yscale": plot.yscale,
            "series": [asdict(s) for s in plot.series]}
    text = json.dumps(data, indent=1).encode()
    write_atomic(folder / f"{plot.name}.json", lambda f: f.write(text))
    return folder / f"{plot.name}.png"
