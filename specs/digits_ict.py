"""iCT on scikit-learn's 8x8 digits: digits_sct's network, data and budget with iCT's objective.

The iCT recipe (cifar10_ict.py) scaled to the digits run: curriculum s0 = 10 to s1 = 1280 over the run,
index log-normal P_mean -1.1 / P_std 2.0, Pseudo-Huber c = 0.00054 sqrt(64), no adaptive weighting,
Adam betas (0.9, 0.999), two-step samples re-noised at sigma = 0.821 as on CIFAR-10; learning rate,
batch, EMA and dropout are digits_sct's, so the two compare at an equal image budget.
"""

import dataclasses
import math

from scm_graph.spec import ObjectiveSpec, OptimSpec

from digits_sct import SPEC as _SCT  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _SCT,
    name="digits_ict",
    objective=ObjectiveSpec(kind="ict", sigma_d=0.5, P_mean=-1.1, P_std=2.0, ict_steps=(10, 1280), adaptive_weighting=False),
    optim=OptimSpec(kind="adam", lr=_SCT.optim.lr, betas=(0.9, 0.999), eps=1e-8),
    train=dataclasses.replace(_SCT.train, eval_t_mid=math.atan(0.821 / 0.5)),  # sigma = 0.821
)
