"""TrigFlow (sCM, Lu & Song 2025, Sec. 3): noising, targets, time proposal, consistency function.

t in [0, pi/2]; x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I). Tensors of per-sample times
have shape [B]; `expand` broadcasts them against [B, C, H, W].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

T_MAX_SIGMA = 80.0  # EDM sigma_max; sampling starts at t_max = arctan(80 / sigma_d)
T_MID = 1.1  # intermediate time of two-step sampling (sCM Sec. 6)
SIGMA_MIN = 0.002  # EDM / iCT sigma_min: the iCT consistency function is the identity there


def expand(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def t_max(sigma_d: float) -> float:
    return math.atan(T_MAX_SIGMA / sigma_d)  # sigma = sigma_d tan(t)  =>  t = arctan(sigma / sigma_d)


def sample_t(tau: Tensor, sigma_d: float) -> Tensor:
    """Proposal: tau ~ N(P_mean, P_std^2) given as `tau`; t = arctan(e^tau / sigma_d) (Sec. 4.2)."""
    return torch.atan(torch.exp(tau) / sigma_d)


def noisy(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = cos(t) x0 + sin(t) z (Eq. 2)."""
    tt = expand(t, x0)
    return torch.cos(tt) * x0 + torch.sin(tt) * z


def velocity(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """Diffusion target / sCT tangent v_t = dx_t/dt = cos(t) z - sin(t) x0 (Eq. 4)."""
    tt = expand(t, x0)
    return torch.cos(tt) * z - torch.sin(tt) * x0


def c_noise(t: Tensor, scale: float = 1.0) -> Tensor:
    """Time conditioning of the network: c_noise(t) = scale * t, the identity by default (Sec. 4.1);
    `scale` is `net.time_scale` (e.g. 1000 for DDPM-style embeddings that expect t in [0, 1000])."""
    return t if scale == 1.0 else scale * t  # c_noise(t) = s t; s = 1 adds no op to the graph


def consistency_fn(x_t: Tensor, t: Tensor, F: Tensor, sigma_d: float) -> Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) (Eq. 5); f(x, 0) = x."""
    tt = expand(t, x_t)
    return torch.cos(tt) * x_t - torch.sin(tt) * sigma_d * F


def pf_ode_velocity(F: Tensor, sigma_d: float) -> Tensor:
    """PF-ODE dx_t/dt = sigma_d F(x_t / sigma_d, t) (Eq. 3)."""
    return sigma_d * F


# --- EDM <-> TrigFlow (Sec. 3) -----------------------------------------------------------------


def edm_sigma(t: Tensor, sigma_d: float) -> Tensor:
    """sigma = sigma_d tan(t)."""
    return sigma_d * torch.tan(t)


def trig_t(sigma: Tensor, sigma_d: float) -> Tensor:
    """t = arctan(sigma / sigma_d)."""
    return torch.atan(sigma / sigma_d)


def edm_to_trig_x(x_edm: Tensor, t: Tensor) -> Tensor:
    """x_trig = cos(t) x_edm, with x_edm = x0 + sigma z_unit."""
    return torch.cos(expand(t, x_edm)) * x_edm


def trig_to_edm_x(x_t: Tensor, t: Tensor) -> Tensor:
    """x_edm = x_trig / cos(t)."""
    return x_t / torch.cos(expand(t, x_t))


def F_from_edm_denoiser(x_t: Tensor, t: Tensor, D: Tensor, sigma_d: float) -> Tensor:
    """sigma_d F = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin(t); returns F."""
    tt = expand(t, x_t)
    return (torch.cos(tt) * x_t - D) / (torch.sin(tt) * sigma_d)


def edm_denoiser_from_F(x_t: Tensor, t: Tensor, F: Tensor, sigma_d: float) -> Tensor:
    """D = cos(t) x_t - sin(t) sigma_d F: the x0-prediction, which equals f(x_t, t)."""
    return consistency_fn(x_t, t, F, sigma_d)


# --- The EDM consistency function with sigma_min (iCT, Song & Dhariwal 2023), in TrigFlow's variables --------


def cm_coefficients(sigma: Tensor, sigma_d: float, sigma_min: float = SIGMA_MIN) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of f(x, sigma) = c_skip x + c_out F(c_in x, c_noise); f(x, sigma_min) = x exactly."""
    c_skip = sigma_d**2 / ((sigma - sigma_min) ** 2 + sigma_d**2)  # c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)
    c_out = sigma_d * (sigma - sigma_min) / torch.sqrt(sigma_d**2 + sigma**2)  # c_out = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_d**2)  # c_in = 1 / sqrt(sigma^2 + sigma_d^2)
    return c_skip, c_out, c_in


def ict_consistency_fn(x_t: Tensor, t: Tensor, F: Tensor, sigma_d: float, sigma_min: float = SIGMA_MIN) -> Tensor:
    """f(x_edm, sigma) = c_skip x_edm + c_out F_edm for a network that saw x_t = cos t x_edm at t = arctan(sigma / sigma_d)
    (its input x_t / sigma_d is then c_in x_edm, so a TrigFlow backbone serves unchanged).

    The network's output is F = -F_edm, TrigFlow's sign: then f ~ cos t x_t - sin t sigma_d F as in TrigFlow (equal
    up to the sigma_min shift), so a TrigFlow checkpoint (diffusion pretraining) starts an iCT run from the same function.
    """
    tt = expand(t, x_t)
    c_skip, c_out, _ = cm_coefficients(sigma_d * torch.tan(tt), sigma_d, sigma_min)  # sigma = sigma_d tan t
    return c_skip * (x_t / torch.cos(tt)) - c_out * F  # f = c_skip x_edm + c_out F_edm(c_in x_edm, c_noise), F_edm = -F
