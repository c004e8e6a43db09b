"""Discrete-time sCM: sCT with the network's time derivative taken over one grid step (sCM Fig. 5c).

Everything is sCT's (TrigFlow parameterisation, network, tangent warmup, normalisation, adaptive
weighting) except the one derivative a discrete-time consistency model approximates: the JVP's
cos t sin t dF^-/dt along the path becomes a backward finite difference over Delta t = t_max / N,
    dF ~ cos t sin t (F^-(x_t, t) - F^-(x_{t'}, t')) / (t - t'),   t' = max(t - Delta t, 0),
with x_{t'} = cos t' x0 + sin t' z on the same data and noise (consistency training's estimate of the
earlier point, sCM Sec. 2). The analytic parts of the tangent (cos t, sin t, dx_t/dt) stay exact. As
N grows the gradient tends to sCT's (tests/objectives/test_discrete.py checks it in float64).

The train loop puts t on the grid t_i = i t_max / N (i = 1..N), so t' is the grid point below. Under bf16 / fp16
autocast the two forwards still run in float32: in half precision the difference of two nearly equal outputs
is mostly rounding (2^-8 of |F| over t_max / N), which would measure the precision, not the discretisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.objectives.common import ObjectiveOut, StepInputs
from scm_graph.objectives.sct import consistency_loss, sct_velocity, tangent_of
from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


def grid_step(cfg: ObjectiveSpec, sigma_d: float) -> float:
    """Delta t = t_max / N, the grid's step."""
    return trigflow.t_max(sigma_d) / cfg.N  # t_i = i t_max / N


def snap_to_grid(t: Tensor, cfg: ObjectiveSpec, sigma_d: float) -> Tensor:
    """Each time moved up to its grid point t_i = i Delta t, i in 1..N (so t - Delta t is the point below)."""
    dt = grid_step(cfg, sigma_d)
    i = torch.ceil(t / dt).clamp(1, cfg.N)  # i = ceil(t / Delta t), at least one step above 0
    return i * dt


def finite_difference_tangent(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, x_t: Tensor, dxt: Tensor,
                              cfg: ObjectiveSpec) -> tuple[Tensor, Tensor]:
    """(F^-, g): Algorithm 1's g with dF from two forward passes one grid step apart instead of a JVP."""
    t = inp.t
    theta_minus = {k: v.detach() for k, v in params.items()}
    t_prev = (t - grid_step(cfg, model.sigma_d)).clamp_min(0.0)  # t' = max(t - Delta t, 0)
    x_prev = trigflow.noisy(inp.x0, inp.z, t_prev)  # x_{t'} = cos t' x0 + sin t' z: the same x0 and z
    with torch.no_grad(), fp32_region(x_t):  # float32 even under bf16 autocast: a half-precision difference is mostly rounding
        F_minus = functional_call(model, theta_minus, inp.forward_args(x_t)).to(x_t.dtype)
        F_prev = functional_call(model, theta_minus, inp.forward_args(x_prev, t_prev)).to(x_t.dtype)
    cos, sin = torch.cos(t), torch.sin(t)
    step = (t - t_prev).clamp_min(torch.finfo(t.dtype).tiny)  # t - t' (masked samples have t = t' = 0)
    dF = trigflow.expand(cos * sin / step, x_t) * (F_minus - F_prev)  # cos t sin t (F(t) - F(t')) / (t - t')
    return F_minus, tangent_of(F_minus, dF, x_t, dxt, t, inp.r, model.sigma_d)


def discrete_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    """Discrete-time sCM on data: sCT's loss with the finite-difference tangent."""
    return consistency_loss(model, params, inp, cfg, sct_velocity, finite_difference_tangent)
