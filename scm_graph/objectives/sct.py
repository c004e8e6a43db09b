"""sCT: continuous-time consistency training, Algorithm 1 of sCM (Lu & Song 2025), exactly.

theta^- is the stop-gradient of the *current* weights (no EMA target). The JVP takes tangents
already scaled by cos(t) sin(t) (the JVP rearrangement, Sec. 5.1), so
    dF = cos t sin t dF/dt,
    g  = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF)  (= cos t df^-/dt at r = 1),
then g / (||g|| + c) per sample, and L = e^{w}/D ||F_theta - F^- - g||^2 - w.

Under bf16 / fp16 autocast the network (and its JVP) runs in half precision, but F^- and dF are cast
back to float32 right after the JVP, and g, ||g||, the normalisation, the loss and w_phi(t) are
computed in float32 (`fp32_region`, docs/design.md "Mixed precision"). A sample whose F^- or g is not finite is
masked: non-finite data is zeroed before both passes; a non-finite F^-, g or F gets 0 and loss weight 0;
all are reported in `nonfinite`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from scm_graph import trigflow
from scm_graph.objectives.common import (
    ObjectiveOut,
    StepInputs,
    finite_samples,
    zero_unless,
)
from scm_graph.objectives.weighting import w_of, weighted
from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


def tangent(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, x_t: Tensor, dxt: Tensor, cfg: ObjectiveSpec) -> tuple[Tensor, Tensor]:
    """Return (F^-, g) with g the un-normalised tangent, both in x_t's dtype (float32 under autocast).

    No gradient flows out of either.
    """
    F_minus, dF = tangent_jvp(model, params, inp, x_t, dxt)
    return F_minus, tangent_of(F_minus, dF, x_t, dxt, inp.t, inp.r, model.sigma_d)


def tangent_jvp(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, x_t: Tensor, dxt: Tensor,
                keep_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(F^-, dF = cos t sin t dF^-/dt along (dx_t/dt, 1)) in x_t's dtype: the JVP of `tangent`. dF is detached;
    so is F^- unless `keep_grad`, when the JVP runs on `params` themselves and its primal output is F_theta(x_t, t)
    of the gradient pass, differentiable in the weights (the same forward, so the same value and dropout masks)."""
    t = inp.t
    theta = params if keep_grad else {k: v.detach() for k, v in params.items()}
    cos, sin = torch.cos(t), torch.sin(t)

    def F_fn(x: Tensor, t_in: Tensor) -> Tensor:
        return functional_call(model, theta, inp.forward_args(x, t_in))  # F_theta(x / sigma_d, t)

    cs = trigflow.expand(cos * sin, x_t)
    # JVP along (dx_t/dt, 1), pre-scaled by cos t sin t (Sec. 5.1 rearrangement); the model divides by sigma_d
    F, dF = jvp(F_fn, (x_t, t), (cs * dxt, cos * sin))
    F = F.to(x_t.dtype) if keep_grad else F.detach().to(x_t.dtype)  # out of half precision at once
    return F, dF.detach().to(x_t.dtype)


def tangent_of(F_minus: Tensor, dF: Tensor, x_t: Tensor, dxt: Tensor, t: Tensor, r: Tensor, sigma_d: float) -> Tensor:
    """Algorithm 1's un-normalised g from the JVP's (F^-, dF), in float32 under autocast."""
    cos, sin = torch.cos(t), torch.sin(t)
    cs = trigflow.expand(cos * sin, x_t)
    with fp32_region(x_t):
        c2 = trigflow.expand(cos.square(), x_t)
        return -c2 * (sigma_d * F_minus - dxt) - trigflow.expand(r, x_t) * (cs * x_t + sigma_d * dF)  # Algorithm 1


def normalize_tangent(g: Tensor, cfg: ObjectiveSpec) -> tuple[Tensor, Tensor]:
    """g / (||g|| + c) per sample (Sec. 4.2), or clip to [-1, 1], or g as it is (Fig. 5a); also returns ||g||."""
    norm = g.flatten(1).norm(dim=1)
    if cfg.tangent_clip:
        return g.clamp(-1.0, 1.0), norm
    if not cfg.tangent_normalize:
        return g, norm
    return g / trigflow.expand(norm + cfg.tangent_c, g), norm


def sct_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    """sCT: the tangent follows the unbiased estimate dx_t/dt = cos t z - sin t x0."""
    return consistency_loss(model, params, inp, cfg, sct_velocity)


def sct_velocity(x_t: Tensor, inp: StepInputs) -> Tensor:
    """sCT's dx_t/dt: the one-sample estimate cos t z - sin t x0."""
    return trigflow.velocity(inp.x0, inp.z, inp.t)


def consistency_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec,
                     dxt_of: Callable[[Tensor, StepInputs], Tensor], tangent_fn: TangentFn | None = None) -> ObjectiveOut:
    """Algorithm 1 with the PF-ODE velocity `dxt_of(x_t, inp)`: the data's estimate (sCT) or a teacher's (sCD)."""
    prep, F = _prepare(model, params, inp, cfg, dxt_of, tangent_fn, fuse=fuses(inp.x0, tangent_fn, cfg.fused_pass))
    if F is None:  # a finite-difference tangent: F_theta needs its own forward
        F = functional_call(model, params, prep.inputs.forward_args(prep.x_t))  # F_theta(x_t / sigma_d, t)
    return consistency_finish(F, w_of(model, params, prep.inputs.t, cfg), prep)


def fuses(x: Tensor, tangent_fn: TangentFn | None, fused_pass: str = "auto") -> bool:
    """Whether `consistency_loss` takes F_theta from the JVP's primal output: JVP tangents, gradient on, and
    `objective.fused_pass` 'on', or 'auto' off the CPU. On the 2-core CPU the two passes are faster compiled
    (docs/bench_step_cpu.md: 199 against 224 ms at 2 threads, side by side), though the fused step is faster at
    1 thread; on accelerators it saves a forward."""
    wanted = fused_pass == "on" or (fused_pass == "auto" and x.device.type != "cpu")
    return wanted and tangent_fn is None and torch.is_grad_enabled()


@dataclass
class ConsistencyPrep:
    """What the JVP pass hands the gradient pass: its inputs, F^- and the normalised tangent (no gradient in any)."""

    inputs: StepInputs  # with non-finite samples zeroed
    x_t: Tensor
    F_minus: Tensor
    g: Tensor  # normalised
    g_norm: Tensor  # [B] ||g|| before normalisation
    ok: Tensor  # [B] bool


TangentFn = Callable[[nn.Module, dict[str, Tensor], StepInputs, Tensor, Tensor, ObjectiveSpec], tuple[Tensor, Tensor]]


def consistency_prepare(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec,
                        dxt_of: Callable[[Tensor, StepInputs], Tensor], tangent_fn: TangentFn | None = None) -> ConsistencyPrep:
    """The JVP pass: x_t, F^- and the normalised tangent g; no gradient flows out of any of them.

    `tangent_fn(model, params, inp, x_t, dx_t/dt, cfg) -> (F^-, g)`: a finite difference's (discrete-time sCM);
    None: the JVP's `tangent` (sCT, sCD), looked up at call time."""
    return _prepare(model, params, inp, cfg, dxt_of, tangent_fn, fuse=False)[0]


def _prepare(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec,
             dxt_of: Callable[[Tensor, StepInputs], Tensor], tangent_fn: TangentFn | None, fuse: bool) -> tuple[ConsistencyPrep, Tensor | None]:
    """`consistency_prepare`, and with `fuse` (JVP tangents only) also F_theta(x_t, t) with its gradient: the JVP's
    primal output, taken on the trained weights, so the gradient pass needs no forward of its own (one JVP and one
    backward per step). F^- is its detached value: bit for bit what a second forward gives for networks without
    attention; with attention, O comes from the fused JVP op instead of SDPA (equal to rounding; the CPU's plain
    attention runs the same ops in both). Eagerly, the JVP on grad-tracking weights also records the tangent's
    autograd graph until it returns (a higher peak than the no-gradient JVP); compiled, AOTAutograd keeps only what
    the backward needs."""
    # Non-finite data is masked *before* both passes, so the JVP pass and the gradient pass still see
    # identical inputs (Inductor shares their forward work; masking x_t between them cost 17%).
    ok = finite_samples(inp.x0, inp.z, inp.t)
    inp = StepInputs(zero_unless(ok, inp.x0), zero_unless(ok, inp.z), zero_unless(ok, inp.t), inp.labels, inp.dropout_key,
                     inp.r, inp.guidance, inp.t_prev)
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    dxt = dxt_of(x_t, inp)  # dx_t/dt
    F = None
    if fuse:
        F, dF = tangent_jvp(model, params, inp, x_t, dxt, keep_grad=True)
        F_minus = F.detach()
        g = tangent_of(F_minus, dF, x_t, dxt, inp.t, inp.r, model.sigma_d)
    else:
        F_minus, g = (tangent_fn or tangent)(model, params, inp, x_t, dxt, cfg)
    ok = ok & finite_samples(F_minus, g)  # non-finite tangents are masked, never trained on
    F_minus, g = zero_unless(ok, F_minus), zero_unless(ok, g)
    with fp32_region(g):
        g, g_norm = normalize_tangent(g, cfg)
    return ConsistencyPrep(inp, x_t, F_minus, g, g_norm, ok), F


def consistency_finish(F: Tensor, w: Tensor, prep: ConsistencyPrep) -> ObjectiveOut:
    """The loss from the gradient pass's F_theta(x_t, t) and w_phi(t): e^w/D ||F - F^- - g||^2 - w."""
    g, ok = prep.g, prep.ok
    F = F.to(g.dtype)
    with fp32_region(g):
        ok = ok & finite_samples(F)
        F = zero_unless(ok, F)  # a select: masked samples pass back zero gradient
        mse = (F - prep.F_minus - g).square().flatten(1).mean(1)  # (1/D)||F_theta - F^- - g||^2
        loss = weighted(mse, w, ok)
    return ObjectiveOut(loss, mse.detach(), w.detach(), prep.g_norm, ~ok)
