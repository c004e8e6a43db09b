"""DDPM++-style U-Net F(x, c_noise, class) with the sCM changes (Lu & Song 2025, Sec. 4.1).

Changes from DDPM++ (Song et al. 2021): identity c_noise(t) = t fed to a positional embedding,
adaptive double normalisation instead of AdaGN, affine-free group norm. Resampling is 2x2 average
pooling / nearest upsampling. Self-attention (`nets.attention.SelfAttention2d`, heads of width
`head_dim`) follows every non-resampling residual block, encoder and decoder, whose resolution is in
`attn_resolutions`, and the first middle block whenever `attn_resolutions` is non-empty (DDPM++ layout;
CIFAR-10 uses 16, EDM2 16 and 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scm_graph.nets.attention import SelfAttention2d, num_heads
from scm_graph.nets.dropout import KeyedDropout
from scm_graph.nets.embedding import ConditionEmbedding
from scm_graph.nets.norm import GroupAdaptiveNorm, group_norm, num_groups


class ResBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample: str = "none",
        dropout: float = 0.0,
        groups: int = 32,
        salt: int = 0,
    ):
        super().__init__()
        self.resample = resample
        self.groups0 = num_groups(in_channels, groups)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = GroupAdaptiveNorm(out_channels, emb_channels, groups)
        self.dropout = KeyedDropout(dropout, salt)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = None
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)
        # Attention applied to this block's output, called as attn(out, emb); set by UNet.
        self.attn: nn.Module | None = None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor, key: Tensor | None) -> Tensor:
        h = self._resample(F.silu(group_norm(x, self.groups0)))
        h = self.conv0(h)
        h = F.silu(self.norm1(h, emb))
        h = self.conv1(self.dropout(h, key))
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        out = (h + x) * (1.0 / math.sqrt(2.0))  # DDPM++ skip scale
        if self.attn is not None:
            out = self.attn(out, emb)
        return out


def check_config(
    img_resolution: int,
    channels: int,
    channel_mult: tuple[int, ...],
    attn_resolutions: tuple[int, ...],
    head_dim: int,
) -> list[bool]:
    """Per level, whether it has attention; one-line ValueError (naming the NetSpec field) on a bad config."""
    levels = len(channel_mult)
    if img_resolution % (2 ** (levels - 1)):
        raise ValueError(f"channel_mult: resolution {img_resolution} not divisible by 2^{levels - 1}")
    res = [img_resolution // 2**level for level in range(levels)]  # resolution of each level
    unreachable = sorted(set(attn_resolutions) - set(res), reverse=True)
    if unreachable:
        raise ValueError(f"attn_resolutions: {unreachable} never reached by the U-Net (its resolutions: {res})")
    has_attn = [r in attn_resolutions for r in res]
    for level, mult in enumerate(channel_mult):
        if has_attn[level] or (attn_resolutions and level == levels - 1):  # the middle block has attention too
            num_heads(channels * mult, head_dim)
    return has_attn


class UNet(nn.Module):
    """F(x, c_noise, class_labels, dropout_key, guidance): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        *,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        dropout: float = 0.0,
        emb_mult: int = 4,
        num_classes: int = 0,
        norm_groups: int = 32,
        attn_resolutions: tuple[int, ...] = (),
        head_dim: int = 64,
        guidance_conditional: bool = False,
    ):
        super().__init__()
        has_attn = check_config(img_resolution, channels, tuple(channel_mult), tuple(attn_resolutions), head_dim)
        emb_ch = channels * emb_mult
        self.emb = ConditionEmbedding(channels, emb_ch, num_classes, guidance_conditional)

        salt = iter(range(1, 1 << 20))
        blk = dict(emb_channels=emb_ch, dropout=dropout, groups=norm_groups)

        def with_attn(block: ResBlock, ch: int, on: bool) -> ResBlock:
            if on:
                block.attn = SelfAttention2d(ch, head_dim, norm_groups)
            return block

        self.conv_in = nn.Conv2d(img_channels, channels * channel_mult[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [channels * channel_mult[0]]
        cout = skips[0]
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.enc.append(ResBlock(cout, cout, resample="down", salt=next(salt), **blk))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, channels * mult
                self.enc.append(with_attn(ResBlock(cin, cout, salt=next(salt), **blk), cout, has_attn[level]))
                skips.append(cout)
        mid_attn = bool(attn_resolutions)  # DDPM++: attention after the first middle block
        self.mid = nn.ModuleList([with_attn(ResBlock(cout, cout, salt=next(salt), **blk), cout, mid_attn and i == 0)
                                  for i in range(2)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels * mult
                self.dec.append(with_attn(ResBlock(cin, cout, salt=next(salt), **blk), cout, has_attn[level]))
            if level > 0:
                self.dec.append(ResBlock(cout, cout, resample="up", salt=next(salt), **blk))
        self.out_groups = num_groups(cout, norm_groups)
        self.conv_out = nn.Conv2d(cout, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        dropout_key: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        emb = self.emb(c_noise, class_labels, guidance)  # float32 [B, emb_ch]
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb, dropout_key)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, dropout_key)
        for block in self.dec:
            if block.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, dropout_key)
        return self.conv_out(F.silu(group_norm(h, self.out_groups)))
