"""The non-finite watch (`scm_graph.train.watch`): read every few steps, it stops a run at exactly the step, with
exactly the count and reason, that reading every step (the loop's old way) would."""

from __future__ import annotations

import random

import torch

from scm_graph.train.step import StepOut
from scm_graph.train.watch import CHECK_EVERY, NONFINITE_PATIENCE, Watch

N = 4  # samples per step


def _out(skipped: bool, overflow: bool, n_bad: int) -> StepOut:
    z = torch.zeros(N)
    return StepOut(z.sum(), z, z, z, z.sum(), torch.arange(N) < n_bad, torch.tensor(n_bad), torch.tensor(skipped),
                   torch.tensor(overflow), N)


def _every_step(steps: list[tuple[bool, bool, int]]) -> tuple[int, int, bool] | None:
    """The old loop: (step, stalled, every sample masked) where it stops, or None."""
    stalled = 0
    for i, (skipped, overflow, n_bad) in enumerate(steps):
        stalled = stalled + 1 if skipped and not overflow else 0
        if stalled >= NONFINITE_PATIENCE:
            return i + 1, stalled, n_bad == N
    return None


def _watched(steps: list[tuple[bool, bool, int]], writes: set[int]) -> tuple[int, int, bool] | None:
    """The loop now: read when the watch is due or a metrics line / checkpoint is (`writes`, 1-based steps)."""
    watch = Watch(torch.device("cpu"))
    for i, (skipped, overflow, n_bad) in enumerate(steps):
        watch.add(_out(skipped, overflow, n_bad))
        if watch.due() or i + 1 in writes:
            seen = watch.read()
            if seen.stalled >= NONFINITE_PATIENCE:
                return i + 1, seen.stalled, seen.all_masked
    return None


def test_reading_every_few_steps_stops_where_reading_every_step_does():
    rng = random.Random(0)
    stops = 0
    for _ in range(400):
        runs = []
        while len(runs) < 120:  # stretches of clean steps and of skipped ones (masked, non-finite, fp16 back-offs)
            kind = rng.choice(["clean", "masked", "nonfinite", "overflow"])
            for _ in range(rng.randint(1, 14)):
                runs.append({"clean": (False, False, rng.choice([0, 0, 1])), "masked": (True, False, N),
                             "nonfinite": (True, False, rng.choice([0, 2])), "overflow": (True, True, 0)}[kind])
        writes = {s for s in range(1, 121) if rng.random() < 0.05}
        want = _every_step(runs)
        assert _watched(runs, writes) == want
        stops += want is not None
    assert 50 < stops < 400  # both outcomes were exercised


def test_the_watch_reads_rarely_while_all_is_well_and_at_every_step_while_updates_are_skipped():
    """Steps 9 to 13 skipped: readings at step 10, then at every step until one finds the skips over (14), then
    every CHECK_EVERY steps again."""
    assert CHECK_EVERY == 10
    watch = Watch(torch.device("cpu"))
    reads = []
    for step in range(1, 31):
        bad = 9 <= step <= 13
        watch.add(_out(bad, False, N if bad else 0))
        if watch.due():
            seen = watch.read()
            reads.append((step, seen.stalled, seen.steps, seen.nonfinite))
    assert reads == [(10, 2, 10, 2 * N), (11, 3, 1, N), (12, 4, 1, N), (13, 5, 1, N), (14, 0, 1, 0), (24, 0, 10, 0)]
