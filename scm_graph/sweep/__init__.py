"""Sweeps: `python -m scm_graph.sweep SWEEP.py` trains spec variants at one image budget over a few seeds, one
run folder each, and writes one table (sweep.md) and plots comparing them (docs/sweep.md).

`sweepfile` (the Sweep dataclass, reading a sweep file, the runs it makes), `state` (what marks a run folder
finished or resumable), `check` (every run's spec built by the train CLI's own parser before any training),
`execute` (a `python -m scm_graph.train` process per run), `stats` (final evaluations, wall time, spikes,
non-finite counts; mean ± std over seeds), `table` (sweep.md), `plots`, `cli`. All but `check` are torch-free.
"""

from scm_graph.sweep.sweepfile import Sweep

__all__ = ["Sweep"]
