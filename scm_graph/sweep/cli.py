"""`python -m scm_graph.sweep SWEEP.py [--out DIR] [--only NAME ...] [--dry-run] [--report-only]` (or `just sweep`).

Reads the sweep file (scm_graph.sweep.sweepfile), builds and checks every run's spec before any training starts
(scm_graph.sweep.check: a bad sweep file, an unknown --only name or an override a spec rejects is one line and
exit code 2), trains the unfinished runs one after another (scm_graph.sweep.execute), then writes
<out>/sweep.md and <out>/plots/*.png from every run folder of the sweep (stats, table, plots). A run that fails
does not stop the sweep; the report is written and the exit code is 1.

--only NAME ...: train only these variants (the report still covers every variant of the sweep).
--dry-run: check everything and list the runs, their state and their train commands; nothing is written.
--report-only: write the report from what the run folders hold now (torch-free: no spec is built, nothing trains).
"""

from __future__ import annotations

import sys
from pathlib import Path

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_dir
from scm_graph.sweep import plots, table
from scm_graph.sweep.execute import command, execute, shown
from scm_graph.sweep.state import RunState, run_state
from scm_graph.sweep.stats import run_result, variant_rows
from scm_graph.sweep.sweepfile import RunPlan, Sweep, default_out, plan, read_sweep_file


def report(sweep: Sweep, source: str, out: Path) -> Path:
    """sweep.md and the plots of every run of the sweep, from the run folders as they are now."""
    runs = plan(sweep, out)
    results = [run_result(r, run_state(r.folder, r.images)) for r in runs]  # every log read before anything is written
    made = plots.write_plots(results, out)
    text = table.render(sweep, source, results, variant_rows(results), made)
    path = table.write(out, text)
    print(f"wrote {path} ({len(sweep.variants)} variants, {len(runs)} runs, {len(made)} plots)", flush=True)
    return path


def dry_run(runs: list[RunPlan], states: list[RunState]) -> None:
    """One line per run: its state and, unless finished, the train command it would run."""
    for r, s in zip(runs, states):
        if s.status == "done":
            print(f"{r.name}: finished ({s.images} images), skipped")
        else:
            what = "new" if s.status == "new" else f"resume at {s.images} images"
            print(f"{r.name}: {what}: {shown(command(r, s))}")
    todo = sum(s.status != "done" for s in states)
    print(f"{len(runs)} runs, {todo} to train; nothing was run (--dry-run)")


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.sweep",
                       description="Train spec variants at one image budget over seeds, then write sweep.md and plots.")
    p.add_argument("sweep", metavar="SWEEP.py", help="sweep file defining SWEEP = Sweep(...) (docs/sweep.md)")
    p.add_argument("--out", help="sweep folder (default: the sweep's out, else runs/sweeps/<file name>)")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME", help="train only these variants")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check and list the runs; train nothing, write nothing")
    mode.add_argument("--report-only", action="store_true", help="only write sweep.md and the plots from the run folders")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    sweep = read_sweep_file(a.sweep)
    out = Path(a.out) if a.out else default_out(sweep, a.sweep)
    runs = plan(sweep, out, a.only)
    if a.report_only:
        if not out.is_dir():
            raise UserError(f"{out}: no such sweep folder (nothing has run yet)")
        report(sweep, a.sweep, out)
        return
    states = [run_state(r.folder, r.images) for r in runs]
    # torch (the train CLI's own checks) is imported only here: --report-only stays torch-free
    from scm_graph.sweep.check import check_runs

    states = check_runs(runs, states)
    if a.dry_run:
        dry_run(runs, states)
        return
    output_dir(out, "--out")
    failures = execute(runs, states)
    report(sweep, a.sweep, out)
    if failures:
        names = ", ".join(f"{f.run} (exit {f.returncode})" for f in failures)
        print(f"error: {len(failures)} run(s) failed: {names}; their output is above, and rerunning the sweep "
              "continues them", file=sys.stderr, flush=True)
        raise SystemExit(1)
