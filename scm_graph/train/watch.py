"""The non-finite watch: what the steps masked or skipped, counted on the device and read every few steps.

A step reports on the device (`StepOut`), and reading its report on the host every step would cost a host
sync per step. The watch adds each report to device counters and reads them (one sync) when `due`:
every CHECK_EVERY steps, before each metrics line or checkpoint (the loop asks), and at every step while
the last reading found updates being skipped. So a run whose updates keep being skipped stops after exactly
NONFINITE_PATIENCE of them in a row, before a checkpoint or metrics line has seen the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scm_graph.train.step import StepOut

NONFINITE_PATIENCE = 10  # consecutive steps without an update (non-finite) before the run stops
CHECK_EVERY = NONFINITE_PATIENCE  # steps between two readings while all is well


@dataclass
class Reading:
    stalled: int  # consecutive steps, up to the last, whose update was skipped (loss-scaler back-offs aside)
    all_masked: bool  # the last skipped step had every sample masked (else its loss or gradient was not finite)
    nonfinite: int  # samples masked since the previous reading
    steps: int  # steps since the previous reading


class Watch:
    def __init__(self, device: torch.device):
        self.device = device
        self.stalled = torch.zeros((), dtype=torch.long, device=device)
        self.all_masked = torch.zeros((), dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self.since = 0  # steps since the last reading
        self.alert = False  # the last reading found skipped updates: read after every step

    def add(self, out: StepOut) -> None:
        """Count one step's report (device work only)."""
        skipped = torch.as_tensor(out.skipped, device=self.device)
        stall = skipped & ~torch.as_tensor(out.loss_scale_overflow, device=self.device)  # fp16 back-offs are expected
        n_bad = torch.as_tensor(out.n_nonfinite, device=self.device)
        self.stalled = torch.where(stall, self.stalled + 1, 0)
        self.all_masked = torch.where(stall, n_bad == out.n_samples, self.all_masked)
        self.nonfinite = self.nonfinite + n_bad
        self.since += 1

    def due(self) -> bool:
        return self.alert or self.since >= CHECK_EVERY

    def read(self) -> Reading:
        """The counters on the host (one sync); the masked count starts again from zero."""
        stalled, all_masked, nonfinite = torch.stack([self.stalled, self.all_masked.long(), self.nonfinite]).tolist()
        self.nonfinite = torch.zeros_like(self.nonfinite)
        reading = Reading(stalled, bool(all_masked), nonfinite, self.since)
        self.since, self.alert = 0, stalled > 0
        return reading
