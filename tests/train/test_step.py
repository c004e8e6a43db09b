"""The train step under mixed precision (bf16 / fp16 autocast on CPU), its fp32 islands, the fp16 loss
scaler, and the guards that keep non-finite values away from the weights."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from scm_graph import trigflow
from scm_graph.model import build_model
from scm_graph.objectives import StepInputs
from scm_graph.objectives.sct import tangent
from scm_graph.precision import autocast
from scm_graph.spec import ObjectiveSpec, Spec
from scm_graph.train.step import StepOut, TrainStep
from tests.helpers import tiny_spec

pytestmark = pytest.mark.usefixtures("torch_defaults")

KINDS = ["sct", "diffusion"]


def _spec(kind: str, precision: str = "fp32") -> Spec:
    spec = tiny_spec()
    return dataclasses.replace(spec, objective=ObjectiveSpec(kind=kind),
                               train=dataclasses.replace(spec.train, precision=precision))


def _model(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(spec).train()
    with torch.no_grad():  # non-zero output and weighting layers, so F, w_phi and every gradient are non-trivial
        m.net.conv_out.weight.normal_(0, 0.1)
        m.w_phi.linear.weight.normal_(0, 0.1)
    return m


def _inputs(B: int = 8, seed: int = 1) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 8, 8, generator=g) * 0.5
    z = torch.randn(B, 1, 8, 8, generator=g) * 0.5
    t = torch.rand(B, generator=g) * 1.5 + 0.02
    return StepInputs(x0, z, t, None, torch.tensor(3), torch.tensor(0.5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _net_output_dtypes(m: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    m.net.conv_out.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def _scale_loss(step: TrainStep, factor: float) -> None:
    """Multiply the compiled function's loss by `factor` (to fake an overflow or a NaN loss)."""
    inner = step.loss_fn

    def scaled(*args):
        loss, *rest = inner(*args)
        return (loss * factor, *rest)

    step.loss_fn = scaled


def _assert_fp32_record(o: StepOut) -> None:
    assert torch.isfinite(o.loss) and torch.isfinite(o.grad_norm)
    assert not o.skipped and o.n_nonfinite == 0
    for x in (o.loss, o.mse, o.w, o.tangent_norm, o.grad_norm):
        assert x.dtype == torch.float32


def _assert_fp32_state(m: torch.nn.Module, step: TrainStep) -> None:
    assert all(p.dtype == torch.float32 for p in m.parameters())
    for st in step.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in st.values() if torch.is_tensor(v) and v.is_floating_point())


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_step_close_to_fp32(kind: str):
    """Same weights and inputs: the bf16 step really runs the net in bf16, and lands near the fp32 step."""
    outs = {}
    for prec in ("fp32", "bf16"):
        spec = _spec(kind, prec)
        m = _model(spec)
        dtypes = _net_output_dtypes(m)
        step = TrainStep(m, spec, compile=False)
        outs[prec] = step(_inputs())
        _assert_fp32_record(outs[prec])
        _assert_fp32_state(m, step)
        want = torch.bfloat16 if prec == "bf16" else torch.float32
        assert dtypes and set(dtypes) == {want}, dtypes  # autocast was on (JVP pass and gradient pass)
    a, b = outs["fp32"], outs["bf16"]
    assert _rel(b.loss, a.loss) < 5e-2
    assert _rel(b.grad_norm, a.grad_norm) < 5e-2
    assert _rel(b.mse, a.mse) < 5e-2
    if kind == "sct":
        assert _rel(b.tangent_norm, a.tangent_norm) < 5e-2
        assert not torch.equal(b.tangent_norm, a.tangent_norm)  # bf16 really fed the JVP


def test_tangent_is_float32_under_bf16_autocast():
    """F^- and g leave the JVP in float32 (the fp32 island), close to the fp32 tangent."""
    spec = _spec("sct")
    m = _model(spec)
    params = dict(m.named_parameters())
    inp = _inputs()
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    dxt = trigflow.velocity(inp.x0, inp.z, inp.t)
    F32, g32 = tangent(m, params, inp, x_t, dxt, spec.objective)
    with autocast("cpu", "bf16"):
        F16, g16 = tangent(m, params, inp, x_t, dxt, spec.objective)
    assert F16.dtype == g16.dtype == torch.float32
    assert not torch.equal(g16, g32)
    assert _rel(g16, g32) < 5e-2 and _rel(F16, F32) < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compiled_step(kind: str):
    """Compiled (fullgraph) bf16 step: near the eager fp32 step; then a batch with one inf sample is masked."""
    ref = TrainStep(_model(_spec(kind)), _spec(kind), compile=False)(_inputs())
    spec = _spec(kind, "bf16")
    m = _model(spec)
    torch._dynamo.reset()
    step = TrainStep(m, spec, compile=True)
    o = step(_inputs())
    _assert_fp32_record(o)
    _assert_fp32_state(m, step)
    assert _rel(o.loss, ref.loss) < 5e-2 and _rel(o.grad_norm, ref.grad_norm) < 5e-2
    if kind == "sct":
        assert _rel(o.tangent_norm, ref.tangent_norm) < 5e-2
    bad = _inputs(seed=2)
    bad.x0[5, 0, 3, 3] = float("inf")
    o = step(bad)  # same shapes: no recompilation, the mask is inside the compiled graph
    assert o.n_nonfinite == 1 and o.nonfinite.tolist() == [i == 5 for i in range(8)]
    assert torch.isfinite(o.loss) and torch.isfinite(o.grad_norm) and not o.skipped
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ----------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_step_with_grad_scaler(kind: str):
    ref = TrainStep(_model(_spec(kind)), _spec(kind), compile=False)(_inputs())
    spec = _spec(kind, "fp16")
    m = _model(spec)
    dtypes = _net_output_dtypes(m)
    step = TrainStep(m, spec, compile=False)
    assert step.scaler.is_enabled()
    o = step(_inputs())
    _assert_fp32_record(o)
    _assert_fp32_state(m, step)
    assert set(dtypes) == {torch.float16}
    assert _rel(o.loss, ref.loss) < 5e-2 and _rel(o.grad_norm, ref.grad_norm) < 5e-2  # unscaled gradients
    assert step.scaler.state_dict()["scale"] == 2.0**16 and step.scaler.state_dict()["_growth_tracker"] == 1


def _never_stepped(step: TrainStep) -> bool:
    """No optimiser state, or (decided on the device: the update ran and was taken back) all of it zero."""
    return all(not torch.is_tensor(v) or not v.any() for st in step.optimizer.state.values() for v in st.values())


@pytest.mark.parametrize("device_skip", [False, True])
def test_fp16_overflow_is_skipped_and_backs_off(device_skip: bool):
    """Gradients that overflow fp16 under the loss scale: no update, the scale halves, counted as overflow
    (the update decided on the host or, as on an accelerator, on the device)."""
    spec = _spec("diffusion", "fp16")
    m = _model(spec)
    step = TrainStep(m, spec, compile=False, device_skip=device_skip)
    _scale_loss(step, 1e30)  # a finite loss whose fp16 gradients overflow
    before = _state(m)
    o = step(_inputs())
    assert torch.isfinite(o.loss) and not torch.isfinite(o.grad_norm)
    assert o.skipped and o.loss_scale_overflow and o.n_nonfinite == 0
    assert step.scaler.get_scale() == 2.0**15
    assert all(torch.equal(v, before[k]) for k, v in m.named_parameters())
    assert _never_stepped(step)


# ----------------------------------------------------------------------------- non-finite guards


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_sample_masked_others_train_normally(kind: str):
    """An inf in one data sample: that sample is masked, and the update equals a step on the other samples."""
    spec = _spec(kind)
    inp = _inputs()
    inp.x0[2, 0, 1, 1] = float("inf")
    keep = [i for i in range(8) if i != 2]
    sub = StepInputs(inp.x0[keep], inp.z[keep], inp.t[keep], None, inp.dropout_key, inp.r)
    m_all, m_sub = _model(spec), _model(spec)
    p0 = _state(m_all)
    o = TrainStep(m_all, spec, compile=False)(inp)
    s = TrainStep(m_sub, spec, compile=False)(sub)
    assert o.n_nonfinite == 1 and o.nonfinite.tolist() == [i == 2 for i in range(8)]
    assert not o.skipped and torch.isfinite(o.loss) and torch.isfinite(o.grad_norm)
    assert o.mse[2] == 0 and o.tangent_norm[2] == 0
    # the masked sample counts as a zero in the batch mean (so a split batch averages exactly): 7/8 of the 7-sample step
    torch.testing.assert_close(o.loss, s.loss * 7 / 8, rtol=1e-5, atol=0)
    torch.testing.assert_close(o.grad_norm, s.grad_norm * 7 / 8, rtol=1e-4, atol=0)
    torch.testing.assert_close(o.mse[keep], s.mse, rtol=1e-5, atol=1e-8)
    pa, pb = _state(m_all), _state(m_sub)  # RAdam's first update is lr x the gradient: 7/8 of the other's
    for k in pa:
        torch.testing.assert_close(pa[k] - p0[k], (pb[k] - p0[k]) * 7 / 8, rtol=0, atol=1e-7)


@pytest.mark.parametrize("device_skip", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_all_nonfinite_batch_skips_the_update(kind: str, device_skip: bool):
    spec = _spec(kind)
    m = _model(spec)
    step = TrainStep(m, spec, compile=False, device_skip=device_skip)
    inp = _inputs()
    inp.x0[:, 0, 0, 0] = float("nan")
    before = _state(m)
    o = step(inp)
    assert o.n_nonfinite == 8 and o.nonfinite.all() and o.skipped and not o.loss_scale_overflow
    assert o.loss.item() == 0.0  # every sample has weight 0
    assert all(torch.equal(v, before[k]) for k, v in m.named_parameters())
    assert _never_stepped(step)


@pytest.mark.parametrize("optim", ["radam", "adam"])
def test_nonfinite_loss_skips_the_update_fp32(optim: str):
    """A NaN loss between clean steps: no update, decided on the host or on the device, where every weight and
    optimiser state ends exactly as with the host's decision (RAdam taken back; Adam fused, skipping itself)."""
    spec = _spec("sct")
    spec = dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, kind=optim))
    runs = {}
    for device_skip in (False, True):
        m = _model(spec)
        step = TrainStep(m, spec, compile=False, device_skip=device_skip)
        inner = step.loss_fn
        step(_inputs(seed=3))  # optimiser state exists
        _scale_loss(step, float("nan"))
        before = _state(m)
        o = step(_inputs())
        assert o.skipped and not o.loss_scale_overflow and o.n_nonfinite == 0
        assert all(torch.equal(v, before[k]) for k, v in m.named_parameters())
        # the next clean step trains as usual
        step.loss_fn = inner
        o = step(_inputs())
        assert not o.skipped and any(not torch.equal(v, before[k]) for k, v in m.named_parameters())
        runs[device_skip] = (_state(m), step.optimizer.state_dict()["state"])
    (host, host_opt), (dev, dev_opt) = runs[False], runs[True]
    for k in host:  # fused Adam rounds differently from the foreach one
        torch.testing.assert_close(dev[k], host[k], rtol=0, atol=0 if optim == "radam" else 1e-6)
    for i in host_opt:
        for k, v in host_opt[i].items():
            torch.testing.assert_close(dev_opt[i][k].float(), v.float(), rtol=0, atol=0 if optim == "radam" else 1e-6)


def test_fp32_step_is_unchanged_by_the_guards():
    """fp32 with finite data: one step equals the plain recipe (mean loss, backward, clip, Adam step)."""
    from scm_graph.objectives.diffusion import diffusion_loss
    from scm_graph.train.update import make_optimizer

    spec = _spec("diffusion")
    m = _model(spec)
    ref = copy.deepcopy(m)
    o = TrainStep(m, spec, compile=False)(_inputs())
    opt = make_optimizer(list(ref.parameters()), spec.optim, device_skip=False)
    out = diffusion_loss(ref, dict(ref.named_parameters()), _inputs(), spec.objective)
    out.loss.backward()
    opt.step()
    torch.testing.assert_close(o.loss, out.loss, rtol=1e-6, atol=0)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_unknown_precision_is_a_user_error():
    from scm_graph.errors import UserError

    spec = _spec("sct", "fp8")
    with pytest.raises(UserError, match="precision"):
        TrainStep(_model(_spec("sct")), spec, compile=False)


# ----------------------------------------------------------------------------- attention networks

ATTN_NETS = {
    "unet_attn": dict(attn_resolutions=(4,), head_dim=4),
    "dit": dict(arch="dit", width=8, depth=2, patch_size=2, head_dim=4, emb_mult=1),
}


def _attn_model(net: str, kind: str, precision: str) -> tuple[torch.nn.Module, Spec]:
    spec = tiny_spec(**ATTN_NETS[net])
    spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind=kind), train=dataclasses.replace(spec.train, precision=precision))
    torch.manual_seed(0)
    m = build_model(spec).train()
    with torch.no_grad():  # perturb every zero-initialised projection so attention shapes F and its tangent
        for name, p in m.named_parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return m, spec


@pytest.mark.slow
@pytest.mark.parametrize("net,precision,backend", [  # the U-Net compiles slowly on CPU: one case per backend
    ("unet_attn", "bf16", "math"), ("dit", "fp32", "math"), ("dit", "bf16", "math"), ("unet_attn", "fp32", "auto"),
    ("dit", "bf16", "auto")])
def test_compiled_sct_step_with_attention(net: str, precision: str, backend: str):
    """The whole sCT step compiled (fullgraph): loss, tangent norm and updated weights match the eager step. With the
    'math' backend the JVP through every attention layer runs the fused op at run time; with 'auto' on the CPU no op
    runs (plain ops, which the compiled graph shares between the JVP pass and the gradient pass)."""
    from scm_graph.ops import calls, use_backend

    results = []
    w0 = _state(_attn_model(net, "sct", precision)[0])
    for compile in (False, True):
        torch._dynamo.reset()
        m, spec = _attn_model(net, "sct", precision)
        n_attn = sum(type(mod).__name__ in ("SelfAttention2d", "DiTBlock") for mod in m.modules())
        with use_backend(backend):
            step = TrainStep(m, spec, compile=compile)
            step(_inputs())  # first call compiles
            before = calls["jvp:math"]
            o = step(_inputs(seed=2))
        assert n_attn > 0 and calls["jvp:math"] - before == (n_attn if backend == "math" else 0)  # counted when it runs
        update = torch.cat([(v - w0[k]).flatten() for k, v in _state(m).items()])  # two optimiser steps
        results.append((o, update))
    (oe, ue), (oc, uc) = results
    tol = 1e-4 if precision == "fp32" else 3e-2
    assert _rel(oc.loss, oe.loss) < tol and _rel(oc.tangent_norm, oe.tangent_norm) < tol
    assert _rel(oc.grad_norm, oe.grad_norm) < tol
    assert torch.nn.functional.cosine_similarity(uc, ue, dim=0) > (0.999 if precision == "fp32" else 0.95)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sct", "diffusion", "discrete", "ict"])
def test_compiled_step_matches_eager(kind: str):
    spec = tiny_spec(dropout=0.0 if kind == "diffusion" else 0.1)
    spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind=kind))
    torch.manual_seed(0)
    eager_model = build_model(spec).train()
    with torch.no_grad():  # non-zero output and weighting layers, so every gradient is non-trivial
        eager_model.net.conv_out.weight.normal_(0, 0.1)
        eager_model.w_phi.linear.weight.normal_(0, 0.1)
    compiled_model = copy.deepcopy(eager_model)
    torch._dynamo.reset()
    eager, compiled = TrainStep(eager_model, spec, compile=False), TrainStep(compiled_model, spec, compile=True)
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        x0 = torch.randn(8, 1, 8, 8, generator=g) * 0.5
        z = torch.randn(8, 1, 8, 8, generator=g) * 0.5
        t = torch.rand(8, generator=g) * 1.5 + 0.02
        t_prev = t * 0.8 if kind == "ict" else None  # iCT: the earlier level of the pair
        inp = StepInputs(x0, z, t, None, torch.tensor(1000 + i), torch.tensor(0.5), None, t_prev)
        a, b = eager(inp), compiled(inp)
        assert torch.isfinite(a.loss) and a.loss.item() != 0
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * abs(a.loss.item()), (i, a.loss, b.loss)
        torch.testing.assert_close(b.mse, a.mse, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.grad_norm, a.grad_norm, rtol=1e-5, atol=1e-7)
        if kind in ("sct", "discrete"):
            torch.testing.assert_close(b.tangent_norm, a.tangent_norm, rtol=1e-5, atol=1e-7)
    pa, pb = dict(eager_model.named_parameters()), dict(compiled_model.named_parameters())
    init = dict(build_model(spec).named_parameters())
    assert any(not torch.equal(pa[k], init[k]) for k in pa)  # the updates did something
    for k in pa:
        assert (pa[k] - pb[k]).abs().max().item() <= 1e-5, k


# ----------------------------------------------------------------------------- gradient clipping


def _clip_spec(kind: str, opt: str, grad_clip: float) -> Spec:
    spec = _spec(kind)
    return dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, kind=opt, lr=1e-2, grad_clip=grad_clip))


def _clip_inputs() -> list[StepInputs]:
    """Three batches whose gradient norms differ (the data scale differs), so clipping changes Adam's update too."""
    out = []
    for i, scale in enumerate((1.0, 3.0, 0.5)):
        inp = _inputs(seed=10 + i)
        out.append(StepInputs(inp.x0 * scale, inp.z, inp.t, None, inp.dropout_key, inp.r))
    return out


def _reference_steps(m0: torch.nn.Module, spec: Spec, inputs: list[StepInputs], clip: float | None):
    """Independent recipe: loss gradient by autograd, global norm in float64, g * min(1, clip / ||g||),
    then a fresh torch.optim optimiser step. Returns (final weights, pre-clip norms)."""
    from scm_graph.objectives import get_objective

    ref = copy.deepcopy(m0)
    o = spec.optim
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.kind]
    opt = cls(ref.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    objective = get_objective(spec.objective.kind)
    norms = []
    for inp in inputs:
        params = dict(ref.named_parameters())
        loss = objective(ref, params, inp, spec.objective).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
        norms.append(norm)
        scale = 1.0 if clip is None else min(1.0, clip / norm)
        for p, g in zip(params.values(), grads):
            p.grad = None if g is None else g * scale
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _state(ref), norms


@pytest.mark.parametrize("opt", ["radam", "adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_clip_rescales_gradients_to_the_clip_norm(kind: str, opt: str):
    """grad_clip c > 0: each update equals an optimiser step on g * min(1, c / ||g||); grad_norm is ||g|| before clipping."""
    inputs = _clip_inputs()
    m0 = _model(_spec(kind))
    _, norms = _reference_steps(m0, _clip_spec(kind, opt, 0.0), inputs, None)
    clip = 0.5 * min(norms)  # every step clips (the norms differ, so the clipped steps are not a uniform rescale)
    spec = _clip_spec(kind, opt, clip)
    want, ref_norms = _reference_steps(m0, spec, inputs, clip)
    unclipped, _ = _reference_steps(m0, spec, inputs, None)

    m = copy.deepcopy(m0)
    step = TrainStep(m, spec, compile=False)
    for i, inp in enumerate(inputs):
        o = step(inp)
        assert not o.skipped
        assert o.grad_norm.item() == pytest.approx(ref_norms[i], rel=1e-4)  # the norm before clipping
        assert o.grad_norm.item() > clip  # this step clips
    got = _state(m)
    w0 = _state(m0)
    for k in want:  # Adam divides by sqrt(v): tiny gradient entries carry float32 rounding up to ~1e-6
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    # the test can tell: the unclipped run lands measurably elsewhere
    gap = max((unclipped[k] - want[k]).abs().max().item() for k in want)
    moved = max((want[k] - w0[k]).abs().max().item() for k in want)
    assert gap > 1e-3 and moved > 1e-3, (gap, moved)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_clip_above_the_norm_changes_nothing(kind: str):
    """A clip larger than every gradient norm: the same weights as no clipping at all (bit for bit) and as
    the independent unclipped recipe."""
    inputs = _clip_inputs()
    m0 = _model(_spec(kind))
    want, norms = _reference_steps(m0, _clip_spec(kind, "radam", 0.0), inputs, None)
    big = 1.5 * max(norms)
    m_off, m_big = copy.deepcopy(m0), copy.deepcopy(m0)
    off, clipped = TrainStep(m_off, _clip_spec(kind, "radam", 0.0), compile=False), TrainStep(m_big, _clip_spec(kind, "radam", big), compile=False)
    for i, inp in enumerate(inputs):
        a, b = off(inp), clipped(inp)
        assert torch.equal(a.grad_norm, b.grad_norm)
        assert b.grad_norm.item() == pytest.approx(norms[i], rel=1e-4)
    got_off, got_big = _state(m_off), _state(m_big)
    for k in want:
        assert torch.equal(got_big[k], got_off[k]), k
        torch.testing.assert_close(got_big[k], want[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_scd_step_matches_eager():
    """The sCD step with a guided class-conditional teacher and a student that takes s: compiled == eager; the
    frozen teacher gets no gradient and is not among the optimised parameters."""
    student_spec = dataclasses.replace(tiny_spec(class_conditional=True), objective=ObjectiveSpec(kind="scd", teacher="t"))
    teacher_spec = dataclasses.replace(tiny_spec(class_conditional=True), objective=ObjectiveSpec(kind="diffusion"))
    torch.manual_seed(0)
    teacher = build_model(teacher_spec).eval()
    with torch.no_grad():
        teacher.net.conv_out.weight.normal_(0, 0.1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    eager_model = build_model(student_spec).train()
    with torch.no_grad():
        eager_model.net.conv_out.weight.normal_(0, 0.1)
        eager_model.w_phi.linear.weight.normal_(0, 0.1)
    compiled_model = copy.deepcopy(eager_model)
    torch._dynamo.reset()
    eager = TrainStep(eager_model, student_spec, compile=False, teacher=teacher)
    compiled = TrainStep(compiled_model, student_spec, compile=True, teacher=teacher)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for g in eager.optimizer.param_groups for p in g["params"]}
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        x0 = torch.randn(8, 1, 8, 8, generator=g) * 0.5
        z = torch.randn(8, 1, 8, 8, generator=g) * 0.5
        t = torch.rand(8, generator=g) * 1.5 + 0.02
        s = 1 + torch.rand(8, generator=g)
        inp = StepInputs(x0, z, t, torch.arange(8) % 10, torch.tensor(1000 + i), torch.tensor(0.5), s)
        a, b = eager(inp), compiled(inp)
        assert torch.isfinite(a.loss) and a.loss.item() != 0
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * abs(a.loss.item()), (i, a.loss, b.loss)
        torch.testing.assert_close(b.tangent_norm, a.tangent_norm, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.grad_norm, a.grad_norm, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())
    pa, pb = dict(eager_model.named_parameters()), dict(compiled_model.named_parameters())
    for k in pa:
        assert (pa[k] - pb[k]).abs().max().item() <= 1e-5, k


def test_compile_options_are_known_to_the_installed_inductor():
    """torch.compile rejects an option its Inductor does not know: the step's options name only what this torch has.
    The CPU threshold goes by its CPU-only name (torch 2.13 on); torch 2.11, without it, keeps Inductor's defaults."""
    import types

    import torch._inductor.config as inductor_config

    from scm_graph.train.step import CPU_REALIZE_OPCOUNT, step_compile_options

    known = set(inductor_config.get_config_copy())
    for device_type, release in (("cpu", None), ("cuda", (3, 6)), ("cuda", (3, 8))):
        assert set(step_compile_options(device_type, triton_release=release)) <= known
    newer = types.SimpleNamespace(realize_opcount_threshold=30, realize_cpu_opcount_threshold=50)  # torch 2.13
    older = types.SimpleNamespace(realize_opcount_threshold=30)  # torch 2.11
    assert step_compile_options("cpu", newer)["realize_cpu_opcount_threshold"] == CPU_REALIZE_OPCOUNT
    assert "realize_opcount_threshold" not in step_compile_options("cpu", newer)
    assert set(step_compile_options("cpu", older)) == set(step_compile_options("cpu", newer)) - {"realize_cpu_opcount_threshold"}
    on_gpu = step_compile_options("cuda", older, triton_release=(3, 8))
    assert "realize_opcount_threshold" not in on_gpu and "realize_cpu_opcount_threshold" not in on_gpu  # GPU: defaults


def test_gpu_kernels_are_1d_with_a_triton_before_3_8():
    """Triton 3.6 / 3.7 fail to compile a 2D-tiled time-embedding kernel of the DiT step for sm_90; 3.8 compiles it."""
    from scm_graph.train.step import gpu_kernel_options, step_compile_options

    assert step_compile_options("cuda", triton_release=(3, 6))["triton.max_tiles"] == 1
    assert step_compile_options("cuda", triton_release=(3, 7))["triton.max_tiles"] == 1
    assert "triton.max_tiles" not in step_compile_options("cuda", triton_release=(3, 8))
    assert "triton.max_tiles" not in step_compile_options("cpu", triton_release=(3, 6))  # C++ kernels: no tiles
    assert gpu_kernel_options("cuda", (3, 6)) == {"triton.max_tiles": 1}  # DDP/FSDP's compiled forward: this alone
    assert gpu_kernel_options("cuda", (3, 8)) == {} and gpu_kernel_options("cpu", (3, 6)) == {}
