"""EDM2's learning-rate schedule (optim.lr_rampup_images, optim.lr_decay_images) against its closed form."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scm_graph.model import build_model
from scm_graph.objectives import StepInputs
from scm_graph.spec import OptimSpec
from scm_graph.train.step import TrainStep, learning_rate
from tests.helpers import tiny_spec


def test_constant_without_a_schedule():
    cfg = OptimSpec(lr=3e-4)
    assert [learning_rate(cfg, n) for n in (0, 1, 10**9)] == [3e-4] * 3


@pytest.mark.parametrize("images", [0, 5, 10, 40, 100, 1000])
def test_rampup_then_inverse_sqrt_decay(images: int):
    cfg = OptimSpec(lr=1e-2, lr_rampup_images=10, lr_decay_images=40)
    ramp = images / 10 if images < 10 else 1.0
    decay = 1.0 if images <= 40 else 1.0 / math.sqrt(images / 40)  # Karras et al. 2024, Eq. 16
    assert learning_rate(cfg, images) == pytest.approx(1e-2 * ramp * decay, rel=1e-12)


def test_the_step_applies_the_schedule():
    """TrainStep sets every parameter group's lr from the images seen before the step."""
    spec = tiny_spec()
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=8, channels=1),
                               optim=dataclasses.replace(spec.optim, lr=1e-3, lr_decay_images=4),
                               train=dataclasses.replace(spec.train, compile=False))
    torch.manual_seed(0)
    step = TrainStep(build_model(spec), spec)
    b = 2
    inp = StepInputs(torch.randn(b, 1, 8, 8), torch.randn(b, 1, 8, 8) * 0.5, torch.full((b,), 0.7), None,
                     torch.tensor(1), torch.tensor(1.0), None)
    step(inp, images=16)
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 2)
