"""generate(): batching, the sampler per model kind, seeds, explicit times; to_uint8."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scm_graph import trigflow
from scm_graph.data.normalize import normalize
from scm_graph.sample.generate import Generator, generate, to_uint8
from scm_graph.sample.samplers import nfe, ode_times
from scm_graph.spec import DataSpec, ObjectiveSpec, Spec
from tests.sample.test_samplers import SD, SHAPE, T_MAX, PointMassModel

pytestmark = pytest.mark.usefixtures("torch_defaults")


def stub(kind: str, seed: int = 0) -> Generator:
    """A generator whose model is the exact point-mass model (every sampler returns the point)."""
    a = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5
    spec = Spec(data=DataSpec(resolution=SHAPE[-1], channels=SHAPE[0]), objective=ObjectiveSpec(kind=kind, sigma_d=SD))
    return Generator(PointMassModel(a, SD), spec, torch.device("cpu"))


def test_generate_uses_the_samplers_and_counts_nfe():
    for kind, solver, steps in [("sct", "heun", 1), ("sct", "heun", 3), ("diffusion", "heun", 6),
                                ("diffusion", "euler", 6)]:
        g = stub(kind)
        x = generate(g, 10, steps=steps, solver=solver, seed=3, batch=4)  # 3 batches
        assert x.shape == (10, *SHAPE) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert g.model.calls == 3 * nfe(g.is_consistency, steps, solver)
        torch.testing.assert_close(x, g.model.a.float().expand_as(x), rtol=0, atol=1e-4)
    g = stub("diffusion")
    assert torch.equal(generate(g, 5, steps=3, seed=1), generate(g, 5, steps=3, seed=1))


def test_generate_times_override_steps():
    g = stub("diffusion")
    a = generate(g, 4, steps=5, seed=2)
    b = generate(g, 4, times=ode_times(5, SD)[:-1], seed=2)  # the trailing 0 is appended
    assert torch.equal(a, b)
    c = stub("sct")
    assert torch.equal(generate(c, 4, steps=2, seed=2), generate(c, 4, times=[T_MAX, 1.1], seed=2))


class TimesSeen(PointMassModel):
    """The point-mass model, recording the time of each call."""

    def __init__(self, a: torch.Tensor):
        super().__init__(a, SD)
        self.times: list[float] = []

    def forward(self, x_t, t, labels=None, dropout_key=None):
        self.times.append(float(t[0]))
        return super().forward(x_t, t, labels, dropout_key)


def test_generate_t_mid_defaults_to_the_checkpoints_eval_t_mid():
    """2 steps sample at [t_max, t_mid]: t_mid given, else the spec's train.eval_t_mid (1.1 unless set)."""
    a = torch.zeros(1, *SHAPE, dtype=torch.float64)
    for spec_t_mid in (None, 0.9):
        spec = Spec(data=DataSpec(resolution=SHAPE[-1], channels=SHAPE[0]), objective=ObjectiveSpec(kind="sct", sigma_d=SD))
        if spec_t_mid is not None:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, eval_t_mid=spec_t_mid))
        g = Generator(TimesSeen(a), spec, torch.device("cpu"))
        assert g.t_mid == (spec_t_mid or trigflow.T_MID) == spec.train.eval_t_mid
        generate(g, 2, steps=2, seed=0)
        generate(g, 2, steps=2, seed=0, t_mid=0.7)
        generate(g, 2, steps=2, seed=0, t_mid=0.7, times=[1.2, 0.4])  # explicit times win
        want = torch.tensor([T_MAX, g.t_mid, T_MAX, 0.7, 1.2, 0.4], dtype=torch.float32).tolist()  # the noise's dtype
        assert g.model.times == want


def test_to_uint8_inverts_normalize():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    for norm, extra in [("pixel", {}), ("channel", {"mean": (80.0,), "std": (90.0,)})]:
        spec = Spec(data=DataSpec(resolution=8, channels=1, normalize=norm, **extra))
        x = normalize(u8, spec.data, 0.5)
        assert torch.equal(to_uint8(x, spec), u8)
        assert torch.equal(to_uint8(x + 100.0, spec), torch.full_like(u8, 255))
        assert torch.equal(to_uint8(x - 100.0, spec), torch.zeros_like(u8))


