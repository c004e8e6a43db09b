"""Exponential moving average of the weights with a half-life counted in images (EDM2 style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_beta(batch: int, images: int, halflife_images: float, rampup: float = 0.0) -> float:
    """beta = 0.5^(batch / half-life); with ramp-up the half-life is at most rampup * images seen."""
    halflife = halflife_images
    if rampup > 0:
        halflife = min(halflife, rampup * images)
    if halflife <= 0:
        return 0.0
    return 0.5 ** (batch / halflife)


class EMA:
    def __init__(self, model: nn.Module):
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        """ema <- beta ema + (1 - beta) theta."""
        names = list(self.params)
        own = dict(model.named_parameters())
        torch._foreach_lerp_([self.params[n] for n in names], [own[n].detach() for n in names], 1.0 - beta)

    def load(self, state: dict[str, Tensor]) -> None:
        for n, p in self.params.items():
            p.copy_(state[n])
