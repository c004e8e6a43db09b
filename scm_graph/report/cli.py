"""`python -m scm_graph.report RUN [RUN ...] [--out DIR]`: plots of run folders' metrics.jsonl and one HTML page.

One run: the report goes to RUN/report/ unless --out names a folder; several runs (overlaid in each plot) need --out.
"""

from __future__ import annotations

from pathlib import Path

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_dir
from scm_graph.report import plots
from scm_graph.report.page import write_page
from scm_graph.report.runs import labels, load_run


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.report",
                       description="Plot training runs' metrics.jsonl over images and write one static HTML page.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (runs/NAME, holding metrics.jsonl)")
    p.add_argument("--out", help="report folder (default for one run: RUN/report; required for several runs)")
    a = p.parse_args(argv)
    folders = [Path(r) for r in a.runs]
    seen = [f.resolve() for f in folders]
    dup = next((f for i, f in enumerate(folders) if seen[i] in seen[:i]), None)
    if dup is not None:
        raise UserError(f"{dup} is given twice")
    if a.out is None and len(folders) > 1:
        raise UserError("several runs: pass --out DIR for their report")
    runs = [load_run(f, name) for f, name in zip(folders, labels(folders))]  # every run read before anything is written
    out = output_dir(a.out if a.out is not None else folders[0] / "report", "--out")
    made = plots.build(runs)
    pngs = [plots.write(plot, out) for plot in made]
    index = write_page(runs, made, pngs, out)
    print(f"wrote {index} ({len(made)} plots, {len(runs)} run{'s' if len(runs) > 1 else ''})")
