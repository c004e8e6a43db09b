"""iCT: discrete-time consistency training (Song & Dhariwal 2023), on our networks.

The consistency function is the EDM parameterisation with sigma_min (`ict_schedule.consistency_fn`):
f(x, sigma) = c_skip(sigma) x + c_out(sigma) F_edm(c_in x, c_noise), f(x, sigma_min) = x. Our networks take
x_t = cos t x_edm with sigma = sigma_d tan t and see x_t / sigma_d = c_in x_edm, so the same backbone
serves: only the output combination differs from TrigFlow's (and the network's F is -F_edm, TrigFlow's sign). Per sample, with the pair
(sigma_i, sigma_{i+1}) drawn by the train loop (`draw_pair`: the curriculum's Karras grid and the
discretised log-normal) and one shared noise z,
    L = lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} n, sigma_{i+1}), f_theta^-(x0 + sigma_i n, sigma_i)),
lambda = 1 / (sigma_{i+1} - sigma_i), d the Pseudo-Huber distance with c = 0.00054 sqrt(D); theta^- is
the stop-gradient of the current weights (no EMA teacher). Both passes use the same dropout key.
With objective.adaptive_weighting the per-sample loss also goes through e^w L - w (off in iCT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.objectives import ict_schedule
from scm_graph.objectives.common import ObjectiveOut, StepInputs, finite_samples, zero_unless
from scm_graph.objectives.weighting import w_of, weighted
from scm_graph.precision import fp32_region
from scm_graph.spec import ObjectiveSpec


@dataclass
class ICTPrep:
    """The no-gradient pass's result: the gradient pass's inputs (at sigma_{i+1}) and its target f^-(x_i, sigma_i)."""

    inputs: StepInputs
    x_t: Tensor  # cos t (x0 + sigma_{i+1} n), t = arctan(sigma_{i+1} / sigma_d)
    target: Tensor  # f_theta^-(x_i, sigma_i), float32 under autocast
    weight: Tensor  # [B] lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), 0 for masked samples
    ok: Tensor  # [B] bool
    huber_c: float
    sigma_d: float


def ict_prepare(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ICTPrep:
    """The target pass: x_{i+1}, x_i on one noise, f^-(x_i, sigma_i) and lambda; no gradient flows out."""
    if inp.t_prev is None:
        raise ValueError("the 'ict' objective needs StepInputs.t_prev (the time of sigma_i)")
    sd = model.sigma_d
    ok = finite_samples(inp.x0, inp.z, inp.t, inp.t_prev)
    inp = StepInputs(zero_unless(ok, inp.x0), zero_unless(ok, inp.z), zero_unless(ok, inp.t), inp.labels, inp.dropout_key,
                     inp.r, inp.guidance, zero_unless(ok, inp.t_prev))
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # cos t (x0 + sigma_{i+1} n): z = sigma_d n shared by both points
    x_prev = trigflow.noisy(inp.x0, inp.z, inp.t_prev)  # cos t' (x0 + sigma_i n)
    theta_minus = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        F_prev = functional_call(model, theta_minus, inp.forward_args(x_prev, inp.t_prev)).to(x_t.dtype)
    with fp32_region(x_t):
        target = ict_schedule.consistency_fn(x_prev, inp.t_prev, F_prev, sd)  # f_theta^-(x_i, sigma_i)
        ok = ok & finite_samples(target)
        target = zero_unless(ok, target)
        wide = torch.float32 if inp.t.device.type == "mps" else torch.float64  # float32 t near pi/2: the gap needs more bits
        gap = trigflow.edm_sigma(inp.t.to(wide), sd) - trigflow.edm_sigma(inp.t_prev.to(wide), sd)  # sigma_{i+1} - sigma_i
        weight = torch.where(ok, 1.0 / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.0).to(x_t.dtype)  # lambda = 1 / (sigma_{i+1} - sigma_i)
    c = ict_schedule.huber_c(x_t[0].numel(), cfg.ict_huber)  # c = 0.00054 sqrt(D)
    return ICTPrep(inp, x_t, target.detach(), weight.detach(), ok, c, sd)


def ict_finish(F: Tensor, w: Tensor, prep: ICTPrep) -> ObjectiveOut:
    """lambda(sigma_i) d(f_theta(x_{i+1}, sigma_{i+1}), f^-) from the gradient pass's F_theta at sigma_{i+1}."""
    target, ok = prep.target, prep.ok
    F = F.to(target.dtype)
    with fp32_region(target):
        ok = ok & finite_samples(F)
        F = zero_unless(ok, F)  # a select: masked samples pass back zero gradient
        f = ict_schedule.consistency_fn(prep.x_t.to(target.dtype), prep.inputs.t, F, prep.sigma_d)  # f_theta(x_{i+1}, sigma_{i+1})
        d = ict_schedule.pseudo_huber(f, target, prep.huber_c)  # sqrt(||f - f^-||^2 + c^2) - c
        loss = weighted(prep.weight * d, w, ok)  # lambda(sigma_i) d, averaged (iCT: no adaptive weighting)
        mse = (f - target).detach().square().flatten(1).mean(1)  # (1/D)||f - f^-||^2, for the logs
    return ObjectiveOut(loss, mse, w.detach(), torch.zeros_like(mse), ~ok)


def ict_loss(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec) -> ObjectiveOut:
    prep = ict_prepare(model, params, inp, cfg)
    F = functional_call(model, params, prep.inputs.forward_args(prep.x_t))  # F_theta(x_{i+1} / sigma_d, t)
    return ict_finish(F, w_of(model, params, prep.inputs.t, cfg), prep)


def draw_pair(gen: torch.Generator, n: int, step: int, total_steps: int, cfg: ObjectiveSpec, sigma_d: float,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """(t, t') = (arctan(sigma_{i+1} / sigma_d), arctan(sigma_i / sigma_d)) for n samples at training step `step`:
    the curriculum's grid N(step), i drawn from the discretised log-normal (iCT Sec. 3.3-3.5)."""
    s0, s1 = cfg.ict_steps
    sigmas = ict_schedule.karras_sigmas(ict_schedule.curriculum_steps(step, total_steps, s0, s1))  # float64
    probs = ict_schedule.index_probs(sigmas, cfg.P_mean, cfg.P_std).to(device=device, dtype=torch.float32)
    i = torch.multinomial(probs, n, replacement=True, generator=gen)  # i ~ p(i)
    t_grid = trigflow.trig_t(sigmas, sigma_d).to(device=device, dtype=torch.float32)  # t = arctan(sigma / sigma_d)
    return t_grid[i + 1], t_grid[i]
