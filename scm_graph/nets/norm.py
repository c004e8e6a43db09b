"""Normalisations: pixel norm, affine-free group norm, and the adaptive double normalisation of sCM.

Adaptive double normalisation (sCM Sec. 4.1) replaces AdaGN / adaLN: y = norm(x) * pnorm(s(emb)) +
pnorm(b(emb)). One base class computes the modulation; the U-Net's variant normalises [B, C, H, W]
with group norm, the DiT's normalises [B, N, C] tokens with layer norm. Norms are affine-free: an
affine GroupNorm inside a compiled `torch.func.jvp` fails at trace time (docs/design.md, "Traps").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scm_graph.precision import fp32_region


def pnorm(v: Tensor, eps: float = 1e-4, dim: int = 1) -> Tensor:
    """Pixel norm over channels (`dim`; -1 for token tensors [B, N, C]): v / sqrt(mean(v^2) + eps) (sCM Sec. 4.1).

    The mean square is taken in float32: in fp16 a value of 256 (EDM2's activation clip) squares past fp16's maximum."""
    w = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # float64 stays float64
    return v * torch.rsqrt(w.square().mean(dim=dim, keepdim=True) + eps).to(v.dtype)


def group_norm(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """Affine-free GroupNorm: scale and shift come from the adaptive norm (affine GN breaks compiled jvp)."""
    return F.group_norm(x, groups, eps=eps)


def num_groups(channels: int, groups: int) -> int:
    """At most `groups` groups of at least 4 channels, dividing `channels`."""
    g = max(1, min(groups, channels // 4))
    while channels % g:
        g -= 1
    return g


class AdaptiveDoubleNorm(nn.Module):
    """y = normalize(x) * pnorm(s(emb)) + pnorm(b(emb)) (sCM Sec. 4.1), in float32 under autocast.

    Subclasses give `normalize` (affine-free) and `channel_dim`, the channel axis of x.
    """

    channel_dim = 1

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.scale = nn.Linear(emb_channels, channels)
        self.shift = nn.Linear(emb_channels, channels)

    def normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        with fp32_region(x):  # emb is float32; the modulation and the norm run in float32 too
            s, b = pnorm(self.scale(emb)), pnorm(self.shift(emb))  # [B, C] each
            shape = [x.shape[0]] + [1] * (x.ndim - 1)
            shape[self.channel_dim] = s.shape[1]
            return self.normalize(x.to(s.dtype)) * s.view(shape) + b.view(shape)


class GroupAdaptiveNorm(AdaptiveDoubleNorm):
    """Adaptive double norm of [B, C, H, W] feature maps over channel groups (the U-Net's)."""

    def __init__(self, channels: int, emb_channels: int, groups: int):
        super().__init__(channels, emb_channels)
        self.groups = num_groups(channels, groups)

    def normalize(self, x: Tensor) -> Tensor:
        return group_norm(x, self.groups)


class TokenAdaptiveNorm(AdaptiveDoubleNorm):
    """Adaptive double norm of [B, N, C] tokens over the channel (last) dim (the DiT's)."""

    channel_dim = -1

    def __init__(self, channels: int, emb_channels: int, eps: float = 1e-6):
        super().__init__(channels, emb_channels)
        self.eps = eps

    def normalize(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)  # affine-free LN (affine breaks compiled jvp)
