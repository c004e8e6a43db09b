"""TrigFlow diffusion on the 8x8 digits: the baseline (and sCT's teacher), sampled with a PF-ODE solver."""

import dataclasses

from scm_graph.spec import ObjectiveSpec, OptimSpec

from digits_sct import SPEC as _SCT  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _SCT,
    name="digits_diffusion",
    objective=ObjectiveSpec(kind="diffusion", sigma_d=0.5, P_mean=-1.0, P_std=1.4),
    optim=OptimSpec(kind="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
)
