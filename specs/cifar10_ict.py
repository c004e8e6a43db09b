"""iCT on CIFAR-10 with the iCT paper's settings (Song & Dhariwal 2023), on our DDPM++ network.

Discrete-time consistency training: EDM parameterisation with sigma_min 0.002, Karras grid (rho 7,
sigma in [0.002, 80]), the doubling curriculum N(k) from s0 = 10 to s1 = 1280, the discretised
log-normal index distribution (P_mean -1.1, P_std 2.0), weighting 1 / (sigma_{i+1} - sigma_i),
Pseudo-Huber c = 0.00054 sqrt(D), no EMA teacher, shared noise; Adam lr 1e-4 betas (0.9, 0.999),
batch 1024, 400k iterations, dropout 0.3, EMA decay 0.99993 per iteration for evaluation (a half-life
of ln 0.5 / ln 0.99993 = 9902 iterations x 1024 = 10.1 Mimg), no adaptive weighting. Two-step samples
re-noise at sigma = 0.821 (t = arctan(0.821 / 0.5)), as the consistency-model papers do on CIFAR-10.

What differs from the paper: the network is our DDPM++ U-Net (positional time embedding of
t = arctan(sigma / sigma_d), adaptive double normalisation) rather than NCSN++ with Fourier features.
"""

import dataclasses
import math

from scm_graph.spec import ObjectiveSpec, OptimSpec

from cifar10_diffusion import SPEC as _BASE  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _BASE,
    name="cifar10_ict",
    net=dataclasses.replace(_BASE.net, dropout=0.3),
    objective=ObjectiveSpec(kind="ict", sigma_d=0.5, P_mean=-1.1, P_std=2.0, ict_steps=(10, 1280), ict_huber=0.00054,
                            adaptive_weighting=False),
    optim=OptimSpec(kind="adam", lr=1e-4, betas=(0.9, 0.999), eps=1e-8),
    train=dataclasses.replace(_BASE.train, batch=1024, total_images=400_000 * 1024, ema_halflife_images=10_140_000,
                              log_every_images=1024 * 100, sample_every_images=10_240_000, ckpt_every_images=10_240_000,
                              eval_t_mid=math.atan(0.821 / 0.5)),  # two steps re-noise at sigma = 0.821
)
