"""Building blocks shared by the networks: time embedding, adaptive double norm, keyed dropout."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """DDPM-style sin/cos embedding of c_noise, frequencies (1/max_positions)^(k/half), k < half.

    With c_noise(t) = t the largest frequency is 1, i.e. a small Fourier scale (sCM Sec. 4.1).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        half = num_channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        arg = c.to(self.freqs.dtype)[:, None] * self.freqs[None, :]  # fp32 under autocast; emb(c) = [cos(w_k c), sin(w_k c)]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def fp32_region(x: Tensor):
    """Autocast off: the time embedding and the adaptive-norm modulation stay float32 (DESIGN.md sec. 2).

    Without autocast this is no context at all, so the fp32 graph has no autocast boundaries in it.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def pnorm(v: Tensor, eps: float = 1e-4, dim: int = 1) -> Tensor:
    """Pixel norm over channels (`dim`; -1 for token tensors [B, N, C]): v / sqrt(mean(v^2) + eps) (sCM Sec. 4.1)."""
    return v * torch.rsqrt(v.square().mean(dim=dim, keepdim=True) + eps)


def group_norm(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """Affine-free GroupNorm: scale and shift come from the adaptive norm (affine GN breaks compiled jvp)."""
    return F.group_norm(x, groups, eps=eps)


def norm_groups(channels: int, groups: int) -> int:
    g = max(1, min(groups, channels // 4))
    while channels % g:
        g -= 1
    return g


class AdaptiveDoubleNorm(nn.Module):
    """y = norm(x) * pnorm(s(emb)) + pnorm(b(emb)), replacing AdaGN (sCM Sec. 4.1)."""

    def __init__(self, channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.groups = norm_groups(channels, groups)
        self.scale = nn.Linear(emb_channels, channels)
        self.shift = nn.Linear(emb_channels, channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        with fp32_region(x):  # emb is float32; the modulation and the norm run in float32 too
            s = pnorm(self.scale(emb))[:, :, None, None]
            b = pnorm(self.shift(emb))[:, :, None, None]
            return group_norm(x.to(s.dtype), self.groups) * s + b


_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """murmur3 fmix32 on int64 holding uint32 values (low bits survive int64 wrap-around)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keyed_uniform(shape: torch.Size, key: Tensor, salt: int, device: torch.device) -> Tensor:
    """Counter-based uniforms in [0, 1): a pure function of (key, salt, element index).

    Unlike torch's RNG this gives the same numbers eagerly and inside torch.compile, and the same
    numbers for the JVP pass (theta^-) and the gradient pass (theta) of one train step.
    """
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, device=device, dtype=torch.int64).reshape(shape)
    seed = _mix32((key.to(device=device, dtype=torch.int64) * 0x9E3779B1 + salt) & _M32)
    h = _mix32((idx ^ seed) & _M32)
    h = _mix32((h + seed * 0x27D4EB2F) & _M32)
    return h.to(torch.float32) * (1.0 / 4294967296.0)


class KeyedDropout(nn.Module):
    """Dropout whose mask is a function of an explicit integer key (see keyed_uniform)."""

    def __init__(self, p: float, salt: int):
        super().__init__()
        self.p = p
        self.salt = salt

    def forward(self, x: Tensor, key: Tensor | None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if key is None:
            return F.dropout(x, self.p, training=True)
        keep = keyed_uniform(x.shape, key, self.salt, x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))
