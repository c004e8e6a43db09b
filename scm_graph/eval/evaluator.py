"""Scoring a generator: n samples per step count, scored by the digits FD (`scm_graph.eval.digits`).

Consistency models sample with 1, 2, ... steps; diffusion models with the PF-ODE solver (`heun` /
`euler`, N steps). Inception FID (clean-fid) for CIFAR-10 and ImageNet comes in a later version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from scm_graph.errors import UserError
from scm_graph.sample.generate import Generator, generate, to_uint8
from scm_graph.sample.samplers import nfe


@dataclass
class EvalRow:
    sampler: str  # "consistency" or "heun" / "euler"
    steps: int
    nfe: int
    fd: float
    n: int
    seconds: float
    guidance: float = 1.0  # the CFG scale s the samples were drawn at


def evaluate(g: Generator, steps: list[int], n: int = 1797, solver: str = "heun", seed: int = 0,
             guidance: float = 1.0) -> list[EvalRow]:
    from scm_graph.eval.digits import digits_fd

    if (g.spec.data.channels, g.spec.data.resolution) != (1, 8):
        raise UserError("FD is only defined for the 8x8 digits so far (Inception FID comes later)")
    rows = []
    for s in steps:
        t0 = time.perf_counter()
        x = generate(g, n, steps=s, solver=solver, seed=seed, guidance=guidance)
        fd = digits_fd(to_uint8(x, g.spec))
        sampler = "consistency" if g.is_consistency else solver
        rows.append(EvalRow(sampler, s, nfe(g.is_consistency, s, solver), fd, n, time.perf_counter() - t0, guidance))
    return rows
