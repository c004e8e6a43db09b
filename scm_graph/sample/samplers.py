"""The samplers: multistep consistency sampling and PF-ODE solvers, as functions of a TrigFlowModel.

Consistency models (Song et al. 2023, Alg. 1 multistep; sCM Sec. 6): x = sigma_d n at t_max,
x0 = f(x, t_max), then for each later t_i: x = cos t_i x0 + sin t_i sigma_d n, x0 = f(x, t_i).
Diffusion models integrate dx_t/dt = sigma_d F(x_t / sigma_d, t) from t_max to 0 (Euler or Heun) on the
EDM time grid (rho = 7, sigma in [0.002, 80]) mapped to TrigFlow by t = arctan(sigma / sigma_d); a
class-conditional one trained with label dropout can follow the guided F_u + s (F_c - F_u) instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from scm_graph import trigflow
from scm_graph.errors import UserError
from scm_graph.model import TrigFlowModel


def check_t_mid(t_mid: float, sigma_d: float, name: str = "t_mid") -> None:
    """One-line UserError naming `name` unless 0 < t_mid < t_max (a finite number)."""
    t_max = trigflow.t_max(sigma_d)
    if not (math.isfinite(t_mid) and 0 < t_mid < t_max):
        raise UserError(f"{name} must lie in (0, t_max) = (0, {t_max:.4f}) for sigma_d {sigma_d:g}, not {t_mid}")


def consistency_times(steps: int, sigma_d: float, t_mid: float = trigflow.T_MID) -> list[float]:
    """1 step: [t_max]; 2 steps: [t_max, t_mid] (sCM: t_mid = 1.1); more: t_max, then steps - 1 times from t_mid
    down in steps of t_mid / steps. UserError unless 0 < t_mid < t_max (steps >= 2)."""
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if steps == 1:
        return [trigflow.t_max(sigma_d)]
    check_t_mid(t_mid, sigma_d)
    if steps == 2:
        return [trigflow.t_max(sigma_d), float(t_mid)]
    mids = np.linspace(t_mid, 0.0, steps, endpoint=False)
    return [trigflow.t_max(sigma_d)] + [float(t) for t in mids[: steps - 1]]


def ode_times(steps: int, sigma_d: float, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """EDM grid sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then t = arctan(sigma/sigma_d), then 0."""
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if steps == 1:
        return [math.atan(sigma_max / sigma_d), 0.0]
    i = np.arange(steps)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(t) for t in np.arctan(sig / sigma_d)] + [0.0]


def _times(x: Tensor, t: float) -> Tensor:
    """[B] copies of t in x's dtype and device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _F(model: TrigFlowModel, x: Tensor, t: float, labels: Tensor | None, guidance: float = 1.0) -> Tensor:
    """F_theta(x / sigma_d, t) at one time for the whole batch; with labels and guidance s != 1 the
    classifier-free-guided F_u + s (F_c - F_u), both passes in one batched call (null label -1); a
    guidance-distilled sCD student takes s as an input instead."""
    if getattr(model, "takes_guidance", False):
        return model(x, _times(x, t), labels, None, torch.full((x.shape[0],), guidance, device=x.device, dtype=x.dtype))
    if labels is None or guidance == 1.0:
        return model(x, _times(x, t), labels)
    xx = torch.cat([x, x])
    F = model(xx, _times(xx, t), torch.cat([labels, torch.full_like(labels, -1)]))
    F_c, F_u = F.chunk(2)
    return F_u + guidance * (F_c - F_u)  # CFG (Ho & Salimans 2022) on the velocity


@torch.no_grad()
def sample_consistency(model: TrigFlowModel, noise: list[Tensor], times: list[float], labels: Tensor | None = None,
                       guidance: float = 1.0, ict: bool = False) -> Tensor:
    """Multistep consistency sampling; `noise[i]` are unit normals, one per time; `guidance` is the CFG scale
    input of a guidance-distilled student. `ict`: an iCT model (EDM consistency function with sigma_min),
    sampled as iCT does: x = sigma_max n, then x = x0 + sqrt(sigma_i^2 - sigma_min^2) n at each later level."""
    sd = model.sigma_d
    f = trigflow.ict_consistency_fn if ict else trigflow.consistency_fn
    x = math.sin(times[0]) * sd * noise[0] if ict else sd * noise[0]  # iCT: cos t_max sigma_max n; sCM: N(0, sigma_d^2 I)
    x0 = f(x, _times(x, times[0]), _F(model, x, times[0], labels, guidance), sd)
    for t_i, n in zip(times[1:], noise[1:]):
        if ict:
            sigma = sd * math.tan(t_i)
            std = math.sqrt(max(sigma**2 - trigflow.SIGMA_MIN**2, 0.0))
            x = math.cos(t_i) * (x0 + std * n)  # x_edm = x0 + sqrt(sigma_i^2 - sigma_min^2) n, seen as cos t_i x_edm
        else:
            x = math.cos(t_i) * x0 + math.sin(t_i) * sd * n  # re-noise to t_i: x = cos t_i x0 + sin t_i sigma_d n
        x0 = f(x, _times(x, t_i), _F(model, x, t_i, labels, guidance), sd)
    return x0


@torch.no_grad()
def sample_ode(model: TrigFlowModel, noise: Tensor, times: list[float], solver: str = "heun", labels: Tensor | None = None,
               guidance: float = 1.0) -> Tensor:
    """Integrate the PF-ODE dx/dt = sigma_d F (Eq. 3) over `times` (decreasing, ending at 0); `guidance` s
    follows the classifier-free-guided velocity of a class-conditional model trained with label dropout."""
    sd = model.sigma_d
    x = sd * noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        h = t_next - t_cur
        d = trigflow.pf_ode_velocity(_F(model, x, t_cur, labels, guidance), sd)
        x_next = x + h * d  # Euler
        if solver == "heun" and t_next > 0:
            d2 = trigflow.pf_ode_velocity(_F(model, x_next, t_next, labels, guidance), sd)
            x_next = x + h * 0.5 * (d + d2)  # Heun (trapezoidal) correction
        x = x_next
    return x


def nfe(consistency: bool, steps: int, solver: str) -> int:
    """Network evaluations per sample: consistency steps, Euler N, Heun 2N - 1."""
    if consistency:
        return steps
    return steps if solver == "euler" else 2 * steps - 1
