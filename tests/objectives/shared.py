"""Inputs and helpers shared by the objective tests (float64, 1x8x8, three samples at t = 0.3, 0.9, 1.35)."""

import torch

from scm_graph.objectives import StepInputs

SD = 0.5


def _inputs(B=3, seed=0, r=1.0, labels=True, sd=SD):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    z = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    t = torch.tensor([0.3, 0.9, 1.35], dtype=torch.float64)[:B]
    lab = torch.arange(B) if labels else None
    return StepInputs(x0, z, t, lab, torch.tensor(7), torch.tensor(r, dtype=torch.float64))


def _grads(m, loss):
    ps = [p for n, p in m.named_parameters() if n.startswith("net.")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps)])


def _poison(m, sample: int, B: int = 3):
    """Make the network's output inf on one sample (finite inputs): a tangent that overflows."""
    inner = m.net.forward
    bad = torch.zeros(B, 1, 1, 1, dtype=torch.float64)
    bad[sample] = float("inf")
    m.net.forward = lambda *a: inner(*a) + bad
    return inner


def _subset(inp: StepInputs, keep: list[int]) -> StepInputs:
    lab = inp.labels[keep] if inp.labels is not None else None
    return StepInputs(inp.x0[keep], inp.z[keep], inp.t[keep], lab, inp.dropout_key, inp.r)
