"""Multi-head self-attention block for the U-Net (DDPM++ layout, Song et al. 2021).

The softmax attention itself is `scm_graph.ops.attention`, so under `torch.func.jvp` the tangent comes
from the fused JVP op (sCM Sec. 5.1) rather than from autograd's forward mode through SDPA (on the CPU, for
small layers in training: forward AD through plain ops, see `scm_graph.ops.routing`).
"""

from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn

from scm_graph import ops
from scm_graph.nets.norm import group_norm, num_groups


def num_heads(channels: int, head_dim: int) -> int:
    """Heads of width about `head_dim`; ValueError unless they split `channels` evenly."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    heads = max(1, channels // head_dim)
    if channels % heads:
        raise ValueError(f"head_dim: {channels} channels do not split into {heads} equal heads of about {head_dim}")
    return heads


class SelfAttention2d(nn.Module):
    """x + proj(attention(qkv(norm(x)))), scaled by 1/sqrt(2); `proj` is zero-initialised."""

    def __init__(self, channels: int, head_dim: int = 64, groups: int = 32):
        super().__init__()
        self.heads = num_heads(channels, head_dim)
        self.groups = num_groups(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(group_norm(x, self.groups))
        q, k, v = rearrange(qkv, "b (three m d) h w -> three b m (h w) d", three=3, m=self.heads)
        o = ops.attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V
        o = rearrange(o, "b m (h w) d -> b (m d) h w", h=h, w=w)
        return (x + self.proj(o)) * (1.0 / math.sqrt(2.0))  # DDPM++ skip scale
