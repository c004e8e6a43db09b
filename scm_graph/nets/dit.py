"""DiT-style transformer F(x, c_noise, class, guidance) (Peebles & Xie 2023) with the sCM changes.

Patches of `patch_size` become tokens of width `width` plus a fixed 2D sin/cos position embedding, then
`depth` pre-norm blocks of multi-head self-attention and a GELU MLP. As in the sCM networks (Lu & Song
2025, Sec. 4.1) time enters through a positional embedding of c_noise(t) = t, and every norm is an
adaptive double normalisation (no adaLN-Zero gates). The attention and MLP output projections and the
final linear are zero-initialised, so F = 0 at init. Attention is `scm_graph.ops.attention`, whose
tangent under `torch.func.jvp` comes from the fused JVP op (sCM Sec. 5.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from scm_graph import ops
from scm_graph.nets.dropout import KeyedDropout
from scm_graph.nets.embedding import ConditionEmbedding
from scm_graph.nets.norm import TokenAdaptiveNorm


def check_config(img_resolution: int, width: int, patch_size: int, head_dim: int) -> None:
    """One-line ValueError (naming the NetSpec field) on a bad config; img_resolution 0 = not known yet."""
    if head_dim <= 0 or width % head_dim:
        raise ValueError(f"head_dim: the DiT width (channels) {width} is not a multiple of head_dim {head_dim}")
    if width % 4:
        raise ValueError(f"channels: the DiT width {width} must be a multiple of 4 (2D sin/cos position embedding)")
    if patch_size <= 0 or img_resolution % patch_size:
        raise ValueError(f"patch_size: resolution {img_resolution} is not divisible by patch_size {patch_size}")


def sincos_2d(grid: int, width: int) -> Tensor:
    """[grid^2, width] fixed embedding of token (i, j), row-major: [sin(i w_k), cos(i w_k), sin(j w_k), cos(j w_k)]."""
    quarter = width // 4
    w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # w_k = 10000^(-k / (width/4)) (Vaswani et al. 2017)
    i, j = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    ai, aj = i.reshape(-1, 1) * w, j.reshape(-1, 1) * w
    return torch.cat([ai.sin(), ai.cos(), aj.sin(), aj.cos()], dim=1).float()


class DiTBlock(nn.Module):
    """x + proj(attention(norm0(x))), then x + fc1(dropout(gelu(fc0(norm1(x))))); proj and fc1 zero-initialised."""

    def __init__(self, width: int, emb_channels: int, heads: int, mlp_ratio: float, dropout: float, salt: int):
        super().__init__()
        self.heads = heads
        hidden = int(width * mlp_ratio)
        self.norm0 = TokenAdaptiveNorm(width, emb_channels)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm1 = TokenAdaptiveNorm(width, emb_channels)
        self.fc0 = nn.Linear(width, hidden)
        self.dropout = KeyedDropout(dropout, salt)
        self.fc1 = nn.Linear(hidden, width)
        for layer in (self.proj, self.fc1):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, emb: Tensor, key: Tensor | None) -> Tensor:
        qkv = self.qkv(self.norm0(x, emb))
        q, k, v = rearrange(qkv, "b n (three m d) -> three b m n d", three=3, m=self.heads)
        o = ops.attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V
        x = x + self.proj(rearrange(o, "b m n d -> b n (m d)"))
        h = F.gelu(self.fc0(self.norm1(x, emb)), approximate="tanh")
        return x + self.fc1(self.dropout(h, key))


class DiT(nn.Module):
    """F(x, c_noise, class_labels, dropout_key, guidance): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        *,
        width: int = 384,
        depth: int = 12,
        patch_size: int = 2,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        emb_mult: int = 1,
        num_classes: int = 0,
        guidance_conditional: bool = False,
    ):
        super().__init__()
        check_config(img_resolution, width, patch_size, head_dim)
        emb_ch = width * emb_mult
        self.patch_size = patch_size
        self.patchify = nn.Conv2d(img_channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(img_resolution // patch_size, width)[None], persistent=False)
        self.emb = ConditionEmbedding(width, emb_ch, num_classes, guidance_conditional)
        heads = width // head_dim
        self.blocks = nn.ModuleList(
            DiTBlock(width, emb_ch, heads, mlp_ratio, dropout, salt=i + 1) for i in range(depth)
        )
        self.norm_out = TokenAdaptiveNorm(width, emb_ch)
        self.out = nn.Linear(width, patch_size * patch_size * img_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        dropout_key: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        emb = self.emb(c_noise, class_labels, guidance)  # float32 [B, emb_ch]

        p, h = self.patch_size, x.shape[-2]
        tokens = rearrange(self.patchify(x), "b c h w -> b (h w) c") + self.pos.to(x.dtype)
        for block in self.blocks:
            tokens = block(tokens, emb, dropout_key)
        out = self.out(self.norm_out(tokens, emb))
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h // p, p=p, q=p)
