"""iCT (objective.kind 'ict') against the paper's formulas in float64: the EDM consistency function in
TrigFlow's variables, the loss lambda(sigma_i) d(f_theta(x_{i+1}), f^-(x_i)) with one shared noise, the
stop-gradient target, the loop's pair draw on the curriculum, and iCT multistep sampling."""

import dataclasses
import math

import pytest
import torch

from scm_graph import trigflow
from scm_graph.objectives import get_objective, get_passes, ict_schedule
from scm_graph.objectives.ict import draw_pair, ict_loss
from scm_graph.sample.samplers import sample_consistency
from scm_graph.spec import ObjectiveSpec
from tests.objectives.shared import SD, _grads, _inputs

CFG = ObjectiveSpec(kind="ict", sigma_d=SD, adaptive_weighting=False, P_mean=-1.1, P_std=2.0)


def _pair_inputs(sig_next=(0.2, 1.5, 20.0), sig_prev=(0.002, 1.1, 14.0)):
    inp = _inputs()
    t = trigflow.trig_t(torch.tensor(sig_next, dtype=torch.float64), SD)
    t_prev = trigflow.trig_t(torch.tensor(sig_prev, dtype=torch.float64), SD)
    return dataclasses.replace(inp, t=t, t_prev=t_prev)


def _edm_f(m, params, x_edm, sigma, labels):
    """The paper's f(x, sigma) = c_skip x + c_out F_edm(c_in x, c_noise), the network called on c_in x directly;
    our network's output is F_edm's negative (TrigFlow's sign)."""
    c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in trigflow.cm_coefficients(sigma, SD))
    t = trigflow.trig_t(sigma, SD)
    F = torch.func.functional_call(m.net, {k[4:]: v for k, v in params.items() if k.startswith("net.")},
                                   (c_in * x_edm, trigflow.c_noise(t), labels, None, None))
    return c_skip * x_edm - c_out * F


def test_consistency_fn_is_the_edm_parameterisation(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs()
    sigma = torch.tensor([0.05, 0.8, 30.0], dtype=torch.float64)
    t = trigflow.trig_t(sigma, SD)
    x_edm = inp.x0 + sigma.reshape(-1, 1, 1, 1) * inp.z / SD  # x0 + sigma n
    x_t = torch.cos(t).reshape(-1, 1, 1, 1) * x_edm
    got = trigflow.ict_consistency_fn(x_t, t, m(x_t, t, inp.labels), SD)
    assert torch.allclose(got, _edm_f(m, params, x_edm, sigma, inp.labels), rtol=1e-10, atol=1e-12)
    # the boundary: f(x, sigma_min) = x exactly, whatever the network says
    t_min = trigflow.trig_t(torch.full((3,), trigflow.SIGMA_MIN, dtype=torch.float64), SD)
    x = torch.cos(t_min).reshape(-1, 1, 1, 1) * inp.x0
    assert torch.allclose(trigflow.ict_consistency_fn(x, t_min, torch.randn_like(x), SD), inp.x0, rtol=1e-12, atol=1e-14)


def test_the_network_keeps_trigflows_sign():
    """f_iCT(x_t, t, F) ~ f_TrigFlow(x_t, t, F) = cos t x_t - sin t sigma_d F (equal but for the sigma_min shift), so a
    TrigFlow checkpoint starts an iCT run from the same consistency function, not its mirror image."""
    g = torch.Generator().manual_seed(0)
    x, F = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = trigflow.trig_t(torch.tensor([0.05, 0.5, 5.0, 80.0], dtype=torch.float64), SD)
    diff = (trigflow.ict_consistency_fn(x, t, F, SD) - trigflow.consistency_fn(x, t, F, SD)).abs().max().item()
    flipped = (trigflow.ict_consistency_fn(x, t, -F, SD) - trigflow.consistency_fn(x, t, F, SD)).abs().max().item()
    assert diff < 3e-2 < 1.0 < flipped, (diff, flipped)  # the sigma_min shift: ~1e-2 on unit-scale x and F


def test_loss_matches_the_paper_formula(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _pair_inputs()
    out = ict_loss(m, params, inp, CFG)
    s1, s0 = trigflow.edm_sigma(inp.t, SD), trigflow.edm_sigma(inp.t_prev, SD)
    n = inp.z / SD  # the shared unit noise
    f1 = _edm_f(m, params, inp.x0 + s1.reshape(-1, 1, 1, 1) * n, s1, inp.labels)
    f0 = _edm_f(m, params, inp.x0 + s0.reshape(-1, 1, 1, 1) * n, s0, inp.labels).detach()
    c = 0.00054 * math.sqrt(64)
    d = torch.sqrt((f1 - f0).flatten(1).pow(2).sum(1) + c * c) - c
    want = (d / (s1 - s0)).mean()
    assert torch.allclose(out.loss, want, rtol=1e-9)
    assert torch.allclose(_grads(m, out.loss), _grads(m, want), rtol=1e-8, atol=1e-12)  # the target is a stop-gradient
    assert not out.nonfinite.any() and out.tangent_norm.abs().sum() == 0


def test_adaptive_weighting_and_two_passes(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _pair_inputs()
    cfg = dataclasses.replace(CFG, adaptive_weighting=True)
    whole = get_objective("ict")(m, params, inp, cfg)
    plain = ict_loss(m, params, inp, CFG)
    assert not torch.allclose(whole.loss, plain.loss)  # e^w L - w with w != 0 (the fixture's w_phi is not zero)
    passes = get_passes("ict")
    prep = passes.prepare(m, params, inp, cfg)
    F, w = m(*prep.inputs.forward_args(prep.x_t), weight=True)
    assert torch.allclose(passes.finish(F, w, prep).loss, whole.loss, rtol=1e-12)


def test_a_non_finite_sample_is_masked_with_zero_gradient(tiny_model64):
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _pair_inputs()
    x0 = inp.x0.clone()
    x0[1] = float("nan")
    out = ict_loss(m, params, dataclasses.replace(inp, x0=x0), CFG)
    assert out.nonfinite.tolist() == [False, True, False] and torch.isfinite(out.loss)
    g = _grads(m, out.loss)
    assert torch.isfinite(g).all()
    keep = ict_loss(m, params, inp, CFG)  # the two others alone, as in a batch of three with one zeroed
    per = [ict_loss(m, params, dataclasses.replace(inp, x0=inp.x0[[i]], z=inp.z[[i]], t=inp.t[[i]], t_prev=inp.t_prev[[i]],
                                                   labels=inp.labels[[i]]), CFG).loss for i in (0, 2)]
    assert torch.allclose(out.loss, sum(per) / 3, rtol=1e-9) and not torch.allclose(out.loss, keep.loss)


def test_needs_the_pair():
    with pytest.raises(ValueError, match="t_prev"):
        ict_loss(None, {}, _inputs(), CFG)


def test_draw_pair_follows_the_curriculum_and_the_index_distribution():
    gen = torch.Generator().manual_seed(0)
    total = 800  # K' = floor(800 / 8) = 100 steps per stage: N = 11, 21, 41, ..., 1281
    for step, n_grid in ((0, 11), (99, 11), (100, 21), (350, 81), (799, 1281)):
        t, t_prev = draw_pair(gen, 4000, step, total, CFG, SD, torch.device("cpu"))
        sig = ict_schedule.karras_sigmas(n_grid)
        grid = trigflow.trig_t(sig, SD).float()
        i = torch.searchsorted(grid, t_prev)  # index of sigma_i
        assert torch.equal(grid[i], t_prev) and torch.equal(grid[i + 1], t)  # adjacent levels of that grid
        if n_grid == 11:
            freq = torch.bincount(i, minlength=10).double() / 4000
            p = ict_schedule.index_probs(sig, -1.1, 2.0)
            assert (freq - p).abs().max() < 0.03  # 4000 draws: SD of a frequency <= 0.008


def test_multistep_sampling_as_ict(tiny_model64):
    """1 step: f(sigma_max n, sigma_max); 2 steps: f(x0 + sqrt(sigma^2 - sigma_min^2) n', sigma) (iCT / CM Alg. 1)."""
    m = tiny_model64.eval()
    params = dict(m.named_parameters())
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([1, 2])
    t_max, t_mid = trigflow.t_max(SD), math.atan(0.821 / SD)
    x = sample_consistency(m, noise, [t_max, t_mid], labels, ict=True)
    s_max = torch.full((2,), 80.0, dtype=torch.float64)
    x0 = _edm_f(m, params, 80.0 * noise[0], s_max, labels)
    s_mid = torch.full((2,), 0.821, dtype=torch.float64)
    want = _edm_f(m, params, x0 + math.sqrt(0.821**2 - 0.002**2) * noise[1], s_mid, labels)
    assert torch.allclose(x, want, rtol=1e-8, atol=1e-10)
