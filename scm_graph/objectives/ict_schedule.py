"""The discrete-time pieces of iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models"): the Karras noise grid, the doubling curriculum N(k), the discretised log-normal index
distribution, the 1 / (sigma_{i+1} - sigma_i) weighting, the Pseudo-Huber distance and the consistency
model's EDM parameterisation with sigma_min. Pure functions of numbers and tensors, no network.

The EDM parameterisation itself (`cm_coefficients`, and `consistency_fn` in TrigFlow's variables) lives in
`scm_graph.trigflow`, where the sampler reaches it too; it is re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scm_graph.trigflow import SIGMA_MIN, cm_coefficients
from scm_graph.trigflow import ict_consistency_fn as consistency_fn

__all__ = ["SIGMA_MIN", "cm_coefficients", "consistency_fn", "curriculum_steps", "huber_c", "index_probs", "karras_sigmas",
           "pair_weight", "pseudo_huber"]

SIGMA_MAX, RHO = 80.0, 7.0  # iCT / EDM (sigma_min: trigflow.SIGMA_MIN)
S0, S1 = 10, 1280  # the curriculum's first and last step counts (iCT Sec. 3.3)
P_MEAN, P_STD = -1.1, 2.0  # the index distribution's log-normal (iCT Sec. 3.5)
HUBER_C_PER_SQRT_D = 0.00054  # c = 0.00054 sqrt(D) (iCT Sec. 3.3)


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """The n noise levels sigma_0 < ... < sigma_{n-1}, from sigma_min to sigma_max (n >= 2)."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 levels, not {n}")
    i = torch.arange(n, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho  # sigma_i = (s_min^(1/rho) + i/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho


def curriculum_steps(k: int, total: int, s0: int = S0, s1: int = S1) -> int:
    """N(k), the grid size at training step k of `total`: s0 doubling to s1 in equal stages, plus one."""
    stage = max(1, total // (int(math.log2(s1 / s0)) + 1))  # K' = floor(K / (log2(s1/s0) + 1))
    return min(s0 * 2 ** (k // stage), s1) + 1  # N(k) = min(s0 2^floor(k/K'), s1) + 1


def index_probs(sigmas: Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> Tensor:
    """p(i) for i = 0 .. N-2 (the pair sigma_i, sigma_{i+1}): a log-normal's mass between the two levels, normalised."""
    cdf = torch.special.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))  # erf((ln s - P_mean) / (sqrt2 P_std))
    mass = cdf[1:] - cdf[:-1]  # p(i) ~ erf(.. s_{i+1} ..) - erf(.. s_i ..)
    return mass / mass.sum()


def pair_weight(sigmas: Tensor, i: Tensor) -> Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) for each index in `i`."""
    return 1.0 / (sigmas[i + 1] - sigmas[i])  # lambda = 1 / (sigma_{i+1} - sigma_i)


def huber_c(dim: int, per_sqrt_d: float = HUBER_C_PER_SQRT_D) -> float:
    """The Pseudo-Huber constant c = 0.00054 sqrt(D) for data of D numbers per sample (`objective.ict_huber` per sqrt D)."""
    return per_sqrt_d * math.sqrt(dim)  # c = 0.00054 sqrt(D)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample (over every axis but the first)."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c  # sqrt(||a - b||^2 + c^2) - c
