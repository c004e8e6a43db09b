"""index.html: plain static HTML with relative links (the plots, their JSON, each run's latest grid, copied in),
and a small table per run."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from scm_graph.paths import write_atomic
from scm_graph.report.plots import Plot
from scm_graph.report.runs import RunLog

_STYLE = """body { font-family: sans-serif; max-width: 1600px; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; } figcaption { font-size: small; }
img.grid { image-rendering: pixelated; max-width: 320px; }"""


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = round(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _num(v: object) -> str:
    return "?" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def summary(run: RunLog) -> list[tuple[str, str]]:
    """The run's table rows (name, value), plain text."""
    last, end = run.steps[-1], run.event("end")
    images = max([last["images"], *(e["images"] for e in run.events)])
    finished = bool(end) and end[-1]["images"] >= last["images"]
    wall = end[-1].get("wall_s") if finished else last.get("wall_s")
    start = run.event("start")
    rows = [("run folder", str(run.folder)), ("spec", run.spec_name),
            ("images", f"{images:,}" + (" (finished)" if finished else " (no end event: running or stopped)")),
            ("steps", _num(last.get("step"))), ("last loss", _num(last.get("loss"))), ("wall time", _duration(wall))]
    if start and isinstance(start[0].get("params"), int):
        rows.append(("parameters", f"{start[0]['params']:,}"))
    for key in run.eval_keys:
        vals = [(e[key], e["images"]) for e in run.event("eval") if isinstance(e.get(key), (int, float))]
        best, at = min(vals)
        rows.append((f"best {key}", f"{best:.4g} at {at:,} images (last {vals[-1][0]:.4g})"))
    bad = sum(s.get("nonfinite", 0) or 0 for s in run.steps), sum(s.get("skipped", 0) or 0 for s in run.steps)
    rows.append(("non-finite samples / skipped steps", f"{bad[0]} / {bad[1]}"))
    return rows


def copy_grid(run: RunLog, out: Path) -> tuple[str, int] | None:
    """Copy the run's newest grid into out/grids/; returns (its relative path, its image count)."""
    found = run.latest_grid()
    if found is None:
        return None
    images, src = found
    rel = f"grids/{re.sub(r'[^A-Za-z0-9._-]', '_', run.label)}-{src.name}"
    (out / "grids").mkdir(exist_ok=True)
    shutil.copyfile(src, out / rel)
    return rel, images


def write_page(runs: list[RunLog], plots: list[Plot], pngs: list[Path], out: Path) -> Path:
    e = html.escape
    title = "training report: " + ", ".join(r.label for r in runs)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>\n<style>{_STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>", "<h2>Runs</h2>"]
    for run in runs:
        parts.append(f"<h3>{e(run.label)}</h3><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary(run)]
        parts.append("</table>")
        grid = copy_grid(run, out)
        if grid:
            rel, images = grid
            parts.append(f"<figure><img class='grid' src='{e(rel)}' alt='samples of {e(run.label)}'>"
                         f"<figcaption>samples of the EMA at {images:,} images ({e(rel)})</figcaption></figure>")
        else:
            parts.append("<p>no sample grid yet</p>")
    parts.append("<h2>Plots</h2><p>x: training images. Each plot's exact series are in the JSON beside it.</p>")
    for plot, png in zip(plots, pngs):
        parts.append(f"<figure><a href='{e(png.name)}'><img src='{e(png.name)}' alt='{e(plot.title)}' width='750'></a>"
                     f"<figcaption>{e(plot.title)} (<a href='{e(plot.name)}.json'>data</a>)</figcaption></figure>")
    parts.append("</body></html>\n")
    text = "\n".join(parts).encode()
    write_atomic(out / "index.html", lambda f: f.write(text))
    return out / "index.html"
