"""Progress: a plain line per interval off a terminal, rich's bar on one, nothing when off (warnings always)."""

from __future__ import annotations

import io

import pytest

import scm_graph.progress as progress
from scm_graph.progress import Progress, resolve_mode
from tests.helpers import PROGRESS_LINE


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A monotonic clock the test moves by hand."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_auto_mode_follows_the_stream():
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode("auto", FakeTTY()) == "bar"
    assert resolve_mode("off", FakeTTY()) == "off" and resolve_mode("bar", io.StringIO()) == "bar"


def test_lines_first_update_then_one_per_interval(clock):
    out = io.StringIO()
    with Progress("run", total=1000, done=100, mode="auto", every_s=30, stream=out) as p:
        clock[0] += 10
        p.update(200, rate=5.0, loss=0.25)  # the first update: a line (the work has started)
        for _ in range(5):
            clock[0] += 10
            p.update(p.done + 100, loss=0.125)  # lines at +30 s only
        p.note("warning: something")
    lines = out.getvalue().splitlines()
    assert lines == [
        "run  200/1000 img (20%)  10 img/s  loss 0.25  elapsed 0:00:10  left 0:01:20",
        "run  500/1000 img (50%)  10 img/s  loss 0.125  elapsed 0:00:40  left 0:00:50",
        "warning: something",
    ]
    assert all(PROGRESS_LINE.fullmatch(ln) for ln in lines[:2])


def test_lines_without_a_loss_or_a_rate(clock):
    out = io.StringIO()
    with Progress("shards", total=10, mode="lines", every_s=1, unit="img", stream=out) as p:
        p.update(0)
    assert out.getvalue() == "shards  0/10 img (0%)  0 img/s  elapsed 0:00:00  left ?\n"


def test_off_prints_only_notes(clock):
    out = io.StringIO()
    with Progress("run", total=10, mode="off", stream=out) as p:
        for i in range(10):
            clock[0] += 100
            p.update(i + 1, loss=1.0)
        p.note("warning: kept")
    assert out.getvalue() == "warning: kept\n"


def test_bar_on_a_terminal_draws_and_notes_without_plain_lines(clock):
    out = FakeTTY()
    with Progress("run", total=10, mode="auto", stream=out) as p:
        p.update(5, rate=2.0, loss=0.5)
        p.note("warning: kept")
    text = out.getvalue()
    assert "warning: kept" in text and "run" in text and "5/10" in text
    assert not any(PROGRESS_LINE.fullmatch(ln) for ln in text.splitlines())


def test_lines_estimate_from_the_speed_since_the_previous_line(clock):
    """A first step that compiles for minutes must not make every later estimate absurd."""
    out = io.StringIO()
    with Progress("run", total=10_000, mode="lines", every_s=10, stream=out) as p:
        clock[0] += 300
        p.update(100)  # compiled for 5 minutes: 0.33 img/s so far
        clock[0] += 10
        p.update(1100)  # then 100 img/s
    first, second = out.getvalue().splitlines()
    assert first == "run  100/10000 img (1%)  0 img/s  elapsed 0:05:00  left 8:15:00"
    assert second == "run  1100/10000 img (11%)  100 img/s  elapsed 0:05:10  left 0:01:29"
