"""Progress of long work: rich's live bar on a terminal, a plain line every few seconds elsewhere.

Under nohup, CI or `> log 2>&1` a live bar prints nothing useful, so 'auto' picks 'lines' when stderr is
not a terminal: `name  64000/256000 img (25%)  512 img/s  loss 0.1234  elapsed 0:02:05  left 0:06:15`.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Literal, TextIO

Mode = Literal["auto", "bar", "lines", "off"]


def resolve_mode(mode: Mode, stream: TextIO | None = None) -> Literal["bar", "lines", "off"]:
    """'auto' -> 'bar' on a terminal, 'lines' otherwise."""
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "bar" if stream.isatty() else "lines"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


class Progress:
    """Counts `done` of `total` units; `update(done, rate=..., loss=...)`, `note(text)` for one-off lines."""

    def __init__(self, name: str, total: int, done: int = 0, mode: Mode = "auto", every_s: float = 30.0,
                 unit: str = "img", stream: TextIO | None = None):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.done, self.rate, self.loss = done, 0.0, math.nan
        self.t0 = self.last = time.monotonic()
        self.done0 = done
        self._bar = None
        self.lines = 0  # plain lines printed
        self.done_last = done  # `done` at the previous line

    def __enter__(self) -> "Progress":
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                            TextColumn("{task.fields[ips]:>8.0f} " + self.unit + "/s  loss {task.fields[loss]:.4g}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, completed=self.done, ips=0.0, loss=math.nan)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, done: int, rate: float | None = None, loss: float | None = None) -> None:
        self.done = done
        if rate is not None:
            self.rate = rate
        if loss is not None:
            self.loss = loss
        if self._bar is not None:
            self._bar.update(self._task, completed=done, ips=self.rate, loss=self.loss)
        elif self.mode == "lines" and (not self.lines or time.monotonic() - self.last >= self.every_s):
            self._line()  # the first update (the work has started), then one every every_s

    def note(self, text: str) -> None:
        """A one-off message (a warning) that does not tear the bar."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:  # warnings reach the user even with progress off
            print(text, file=self.stream, flush=True)

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.t0
        # the speed since the previous line (a first step that compiles does not skew every later estimate)
        t_ref, done_ref = (self.last, self.done_last) if self.lines else (self.t0, self.done0)
        speed = (self.done - done_ref) / (now - t_ref) if now > t_ref else 0.0
        left = (self.total - self.done) / speed if speed > 0 else math.inf
        self.last, self.done_last, self.lines = now, self.done, self.lines + 1
        pct = 100.0 * self.done / self.total if self.total else 100.0
        loss = f"  loss {self.loss:.4g}" if math.isfinite(self.loss) else ""
        print(f"{self.name}  {self.done}/{self.total} {self.unit} ({pct:.0f}%)  {speed:.0f} {self.unit}/s{loss}  "
              f"elapsed {_clock(elapsed)}  left {_clock(left)}", file=self.stream, flush=True)
