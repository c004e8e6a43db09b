"""`draw_inputs`, the randomness of one train step, against its documented distributions:
z ~ N(0, sigma_d^2), tau = log(sigma_d tan t) ~ N(P_mean, P_std^2), r = min(1, images / warmup_images)
(1 when warmup_images <= 0), dropout key (seed << 32) + step, labels only for a class-conditional net, and for
class-conditional diffusion label dropout to the null class -1 with probability objective.label_dropout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scm_graph.data.stream import Batch
from scm_graph.spec import ObjectiveSpec, Spec
from scm_graph.train.loop import draw_inputs
from tests.helpers import tiny_spec

pytestmark = pytest.mark.usefixtures("torch_defaults")

CPU = torch.device("cpu")
# deliberately not the defaults (sigma_d 0.5, P_mean -1.0, P_std 1.4): a hard-coded constant would show
SIGMA_D, P_MEAN, P_STD = 0.8, -0.4, 1.1


def _spec(class_conditional: bool = False, seed: int = 0, warmup_images: int = 1000, **objective) -> Spec:
    spec = tiny_spec(class_conditional=class_conditional)
    obj = ObjectiveSpec(sigma_d=SIGMA_D, P_mean=P_MEAN, P_std=P_STD, warmup_images=warmup_images, **objective)
    return dataclasses.replace(spec, objective=obj, train=dataclasses.replace(spec.train, seed=seed))


def _batch(B: int = 16, labelled: bool = True) -> Batch:
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(B, 1, 8, 8, generator=g) * SIGMA_D
    return Batch(x0, torch.arange(B) % 10 if labelled else None)


def _draw(spec: Spec, b: Batch | None = None, step: int = 0, images: int = 0, gen_seed: int = 7):
    gen = torch.Generator().manual_seed(gen_seed)
    return draw_inputs(b if b is not None else _batch(), gen, spec, step, images, CPU)


def test_noise_and_time_distributions():
    """Over a large batch: z has mean 0 and std sigma_d; tau = log(sigma_d tan t) has mean P_mean and std P_std."""
    B = 20_000
    inp = _draw(_spec(), _batch(B))
    z = inp.z.double()
    n = z.numel()  # 1.28M values
    assert z.shape == inp.x0.shape
    assert abs(z.mean().item()) < 5 * SIGMA_D / math.sqrt(n)
    assert abs(z.std().item() - SIGMA_D) < 5 * SIGMA_D / math.sqrt(2 * n)
    # per sample too: each image's noise has the same scale (not one scale per batch)
    per = z.flatten(1).std(dim=1)
    assert abs(per.mean().item() - SIGMA_D) < 0.02

    assert inp.t.shape == (B,) and inp.t.dtype == torch.float32
    assert bool(((inp.t > 0) & (inp.t < math.pi / 2)).all())
    tau = torch.log(SIGMA_D * torch.tan(inp.t.double()))
    assert abs(tau.mean().item() - P_MEAN) < 5 * P_STD / math.sqrt(B)
    assert abs(tau.std().item() - P_STD) < 5 * P_STD / math.sqrt(2 * B)
    # the data are passed through untouched
    assert torch.equal(inp.x0, _batch(B).x0)


def test_time_proposal_is_log_normal_ks():
    """Kolmogorov-Smirnov: tau = log(sigma_d tan t) against N(P_mean, P_std^2), and z / sigma_d against N(0, 1)."""
    stats = pytest.importorskip("scipy.stats")
    inp = _draw(_spec(), _batch(5000))
    tau = torch.log(SIGMA_D * torch.tan(inp.t.double())).numpy()
    assert stats.kstest(tau, "norm", args=(P_MEAN, P_STD)).pvalue > 1e-3
    # the same statistic rejects the default proposal's parameters (the test has power at this size)
    assert stats.kstest(tau, "norm", args=(-1.0, 1.4)).pvalue < 1e-6
    z = inp.z.double().flatten()[:50_000].numpy()
    assert stats.kstest(z, "norm", args=(0.0, SIGMA_D)).pvalue > 1e-3
    assert stats.kstest(z, "norm", args=(0.0, 0.5)).pvalue < 1e-6


def test_draws_differ_per_step_and_repeat_per_generator_state():
    """Consecutive steps on one generator draw new z and t; the same generator state draws the same ones."""
    spec, b = _spec(), _batch()
    gen = torch.Generator().manual_seed(7)
    a = draw_inputs(b, gen, spec, 0, 0, CPU)
    c = draw_inputs(b, gen, spec, 1, 16, CPU)
    assert not torch.equal(a.z, c.z) and not torch.equal(a.t, c.t)
    again = _draw(spec, b)
    assert torch.equal(a.z, again.z) and torch.equal(a.t, again.t)


@pytest.mark.parametrize("images,warmup,want", [
    (0, 1000, 0.0), (16, 1000, 0.016), (500, 1000, 0.5), (1000, 1000, 1.0), (4096, 1000, 1.0),
    (0, 0, 1.0), (16, 0, 1.0), (0, -5, 1.0),
])
def test_warmup_ratio(images: int, warmup: int, want: float):
    inp = _draw(_spec(warmup_images=warmup), images=images)
    assert inp.r.dtype == torch.float32 and inp.r.shape == ()
    assert inp.r.item() == pytest.approx(want, rel=1e-6, abs=0)


def test_dropout_keys_per_step_and_seed():
    keys = {}
    for seed in (0, 1, 5, 2**31 - 1):
        for step in (0, 1, 2, 999, 1_000_003):
            inp = _draw(_spec(seed=seed), step=step)
            assert inp.dropout_key.dtype == torch.int64 and inp.dropout_key.shape == ()
            assert inp.dropout_key.item() == (seed << 32) + step
            keys[(seed, step)] = inp.dropout_key.item()
    assert len(set(keys.values())) == len(keys)  # every (seed, step) its own key


def test_labels_only_for_class_conditional_nets():
    b = _batch()
    assert _draw(_spec(class_conditional=False), b).labels is None
    cond = _draw(_spec(class_conditional=True), b).labels
    assert cond is not None and torch.equal(cond, b.label) and cond.dtype == torch.int64
    assert _draw(_spec(class_conditional=False), _batch(labelled=False)).labels is None


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_label_dropout_for_class_conditional_diffusion(p: float):
    """Each label becomes the null class -1 with probability p, independently; the other draws are unchanged."""
    B = 4000
    b = Batch(torch.zeros(B, 1, 8, 8), torch.arange(B) % 10)
    spec = _spec(class_conditional=True, kind="diffusion", label_dropout=p)
    inp = _draw(spec, b)
    null = inp.labels == -1
    assert torch.equal(inp.labels[~null], b.label[~null])
    se = math.sqrt(p * (1 - p) / B)
    assert abs(null.float().mean().item() - p) < 4 * se
    base = _draw(_spec(class_conditional=True, kind="diffusion", label_dropout=0.0), b)
    assert torch.equal(base.labels, b.label)  # p = 0: no draw, no change
    torch.testing.assert_close(inp.z, base.z, rtol=0, atol=0)  # drawn after z and t: those stay as they were
    torch.testing.assert_close(inp.t, base.t, rtol=0, atol=0)


def test_no_label_dropout_outside_class_conditional_diffusion():
    b = _batch()
    assert torch.equal(_draw(_spec(class_conditional=True, kind="sct", label_dropout=0.5), b).labels, b.label)
    assert _draw(_spec(class_conditional=False, kind="diffusion", label_dropout=0.5), b).labels is None


def test_discrete_times_sit_on_the_grid():
    """objective.kind 'discrete': t = i t_max / N with i in 1..N, each proposal draw moved up to its grid point."""
    from scm_graph import trigflow

    spec = _spec(kind="discrete", N=40)
    inp = _draw(spec, _batch(B=512))
    plain = _draw(_spec(), _batch(B=512))  # the same generator state: the same proposal draws before the snap
    dt = trigflow.t_max(SIGMA_D) / 40
    i = inp.t / dt
    assert torch.allclose(i, i.round(), atol=1e-4) and i.min() >= 1 - 1e-4 and i.max() <= 40 + 1e-4
    assert (inp.t >= plain.t - 1e-6).all() and (inp.t - plain.t < dt + 1e-6).all()
    assert inp.t_prev is None


def test_ict_pairs_follow_the_curriculum():
    """objective.kind 'ict': (t, t_prev) are adjacent levels of the curriculum's Karras grid at this step."""
    from scm_graph import trigflow
    from scm_graph.objectives import ict_schedule

    spec = _spec(kind="ict")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, total_images=16 * 800, batch=16))  # 800 steps
    for step, n_grid in ((0, 11), (250, 41), (799, 1281)):
        inp = _draw(spec, step=step)
        grid = trigflow.trig_t(ict_schedule.karras_sigmas(n_grid), SIGMA_D).float()
        i = torch.searchsorted(grid, inp.t_prev)
        assert torch.equal(grid[i], inp.t_prev) and torch.equal(grid[i + 1], inp.t)
