"""EDM2's U-Net F(x, c_noise, class, guidance) (Karras et al. 2024, config G) with the sCM changes.

Kept from EDM2 config G: magnitude-preserving (MP) layers throughout — weight-normalised convolutions and
linears without biases (each output channel's weight divided by its norm in forward, gain 1/sqrt(fan_in)),
mp_silu, mp_sum (res_balance, attn_balance, label_balance) and mp_cat (concat_balance) for the decoder
skips —, pixel norm in encoder blocks, a constant-ones input channel, 1x1 skip convolutions where the width
changes, 2x2 average-pool down / nearest up resampling, `num_blocks` encoder blocks per level with a
downsampling block between levels, `num_blocks + 1` decoder blocks per level with an upsampling block, two
middle blocks (the first with attention), cosine attention (q, k, v pixel-normalised per head), activations
clipped at 256, and a learnable output gain initialised to 0 (F = 0 at init).

The sCM changes (Lu & Song 2025, Sec. 4.1): (a) time enters through a positional embedding of
c_noise(t) = t (`nets.embedding.PositionalEmbedding`) instead of MP-Fourier features of ln(sigma)/4;
(b) each block's modulation `y * (emb_linear(emb) + 1)` becomes the adaptive double normalisation
`pnorm(y) * pnorm(scale(emb)) + pnorm(shift(emb))`. Its norm is the pixel norm over channels, with no
affine part: config G removed EDM2's group norms because statistics pooled over space tie the function to
the image size, and kept only the per-pixel channel norm, which is also what the encoder blocks and the
cosine attention use; it is elementwise in space, cheap under the JVP and compiles. scale and shift are MP
linears (their outputs are pixel-normalised, so only their direction matters and forced weight
normalisation keeps their effective learning rate what EDM2 tuned). (c) The TrigFlow parameterisation is
outside the net (`model.TrigFlowModel`). t, the embedding and the modulation run in float32 under autocast.

Left out: EDM2's `emb_gain` (the double norm replaces the modulation it scaled), the MP-Fourier time
features, and forced weight normalisation inside forward: the train step calls `renormalize_()` after each
optimiser step instead, since the forward runs under `functional_call`, `torch.func.jvp` and `torch.compile`.
Attention goes through `scm_graph.ops.attention` (the fused JVP op, sCM Sec. 5.1).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from scm_graph import ops
from scm_graph.nets.attention import num_heads
from scm_graph.nets.dropout import KeyedDropout
from scm_graph.nets.embedding import PositionalEmbedding, class_one_hot
from scm_graph.nets.norm import pnorm
from scm_graph.precision import fp32_region

CLIP_ACT = 256.0  # EDM2 clips block outputs to [-256, 256]

# ---------------------------------------------------------------------------------------------
# Magnitude-preserving primitives


def normalize(w: Tensor, eps: float = 1e-4) -> Tensor:
    """Each output channel (dim 0) of `w` scaled to unit RMS, i.e. to norm sqrt(fan_in) (EDM2 Eq. 66); scale-invariant."""
    fan_in = math.prod(w.shape[1:])  # not w[0]: an FSDP2 shard may hold no rows
    rms = torch.linalg.vector_norm(w, dim=tuple(range(1, w.ndim)), keepdim=True) / math.sqrt(max(fan_in, 1))
    return w / rms.clamp_min(eps)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU scaled to keep unit variance for N(0, 1) inputs (EDM2 Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float) -> Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float) -> Tensor:
    """[w_a a, w_b b] over channels, w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b), C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2)) (EDM2 Eq. 103)."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=1)


class MPConv(nn.Module):
    """Bias-free convolution (`kernel` > 0, same padding) or linear layer (`kernel` 0) on normalised weights:
    w_o / ||w_o|| * gain per output channel (EDM2 Eq. 47), so unit-variance inputs give unit-variance outputs at gain 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 0):
        super().__init__()
        shape = (out_channels, in_channels) + ((kernel, kernel) if kernel else ())
        self.weight = nn.Parameter(torch.randn(shape))
        self.fan_in = in_channels * max(kernel, 1) ** 2

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = normalize(self.weight) * (gain / math.sqrt(self.fan_in))  # unit-norm rows times gain (EDM2 Eq. 47)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def renormalize_(self, apply: torch.Tensor | None = None) -> None:
        """Forced weight normalisation (EDM2 Eq. 66): the stored weight projected onto its sphere, in place; only
        where the bool [] tensor `apply` is set, if given (a skipped update leaves the weight exactly as it was).
        Under FSDP2 the weight is a DTensor sharded on dim 0; each output channel's norm is local to its shard."""
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        w.copy_(normalize(w) if apply is None else torch.where(apply, normalize(w), w))


# ---------------------------------------------------------------------------------------------
# Embedding and blocks


class EDM2Embedding(nn.Module):
    """[B] c_noise (+ [B] labels, + [B] CFG scale) -> [B, emb_channels] float32 embedding (EDM2's, with sCM's time input).

    emb = mp_silu(mp_sum(noise(sqrt(2) pos(c_noise) + guidance(pos(s))), label(sqrt(N) one_hot(y)), label_balance)).
    Label -1 is the null class (a zero one-hot, as EDM2's unconditional input); `guidance` is a zero-initialised
    plain linear on a positional embedding of the CFG scale s (sCM Sec. 6), as in `nets.embedding.ConditionEmbedding`.
    """

    def __init__(self, noise_channels: int, emb_channels: int, num_classes: int = 0, label_balance: float = 0.5,
                 guidance: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.label_balance = label_balance
        self.pos = PositionalEmbedding(noise_channels)
        self.guidance = nn.Linear(noise_channels, noise_channels) if guidance else None
        if self.guidance is not None:
            nn.init.zeros_(self.guidance.weight)
            nn.init.zeros_(self.guidance.bias)
        self.noise = MPConv(noise_channels, emb_channels)
        self.label = MPConv(num_classes, emb_channels) if num_classes else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        with fp32_region(c_noise):  # t and the embedding stay float32 under autocast
            f = self.pos(c_noise) * math.sqrt(2.0)  # unit RMS, as EDM2's MP-Fourier features (Eq. 75)
            if self.guidance is not None:
                if guidance is None:
                    raise ValueError("this network is guidance-conditional: pass guidance (the CFG scale s, shape [B])")
                f = f + self.guidance(self.pos(guidance))  # the CFG scale s as an extra input (sCM Sec. 6)
            emb = self.noise(f)
            if self.label is not None:
                one_hot = class_one_hot(class_labels, self.num_classes).to(emb.dtype)
                y = self.label(one_hot * math.sqrt(self.num_classes))  # unit-RMS one-hot (EDM2)
                emb = mp_sum(emb, y, self.label_balance)
            return mp_silu(emb)


class AdaptivePixelNorm(nn.Module):
    """y = pnorm(x) * pnorm(scale(emb)) + pnorm(shift(emb)), pixel norm over the channels of [B, C, H, W]
    (sCM Sec. 4.1, adaptive double normalisation), with MP linears; float32 under autocast."""

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.scale = MPConv(emb_channels, channels)
        self.shift = MPConv(emb_channels, channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        with fp32_region(x):  # emb is float32; the modulation and the norm run in float32 too
            s, b = pnorm(self.scale(emb)), pnorm(self.shift(emb))  # [B, C] each
            return pnorm(x.to(s.dtype)) * s[:, :, None, None] + b[:, :, None, None]


class Block(nn.Module):
    """EDM2's encoder / decoder block (Karras et al. 2024, Fig. 21) with the adaptive double norm in place of the
    modulation; `resolution` is the side of its output (where its residual branch runs)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        flavor: Literal["enc", "dec"],
        resolution: int,
        resample: Literal["keep", "down", "up"] = "keep",
        heads: int = 0,
        dropout: float = 0.0,
        salt: int = 0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
    ):
        super().__init__()
        self.flavor, self.resolution, self.resample = flavor, resolution, resample
        self.out_channels, self.heads = out_channels, heads
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.conv_skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.norm = AdaptivePixelNorm(out_channels, emb_channels)
        self.dropout = KeyedDropout(dropout, salt)
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, 1) if heads else None
        self.attn_proj = MPConv(out_channels, out_channels, 1) if heads else None

    def forward(self, x: Tensor, emb: Tensor, key: Tensor | None) -> Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)  # EDM2's [1, 1] filter: 2x2 box
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pnorm(x)  # pixel norm (EDM2 config G)

        y = self.conv_res0(mp_silu(x))
        y = mp_silu(self.norm(y, emb))  # adaptive double norm replaces y * (emb_linear(emb) + 1) (sCM Sec. 4.1)
        y = self.conv_res1(self.dropout(y, key))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)

        if self.heads:
            h = x.shape[-2]
            qkv = rearrange(self.attn_qkv(x), "b (m d three) h w -> three b m (h w) d", three=3, m=self.heads)
            q, k, v = pnorm(qkv, dim=-1).unbind(0)  # cosine attention: q, k, v pixel-normalised per head (EDM2)
            o = ops.attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V
            x = mp_sum(x, self.attn_proj(rearrange(o, "b m (h w) d -> b (m d) h w", h=h)), self.attn_balance)
        return x.clamp(-CLIP_ACT, CLIP_ACT)  # activation clipping (EDM2); clamp, not clip_: no in-place op under jvp


# ---------------------------------------------------------------------------------------------
# The network


def check_config(
    img_resolution: int,
    channels: int,
    channel_mult: tuple[int, ...],
    attn_resolutions: tuple[int, ...],
    head_dim: int,
    dropout_resolutions: tuple[int, ...] = (),
    res_balance: float = 0.3,
    attn_balance: float = 0.3,
    concat_balance: float = 0.5,
    label_balance: float = 0.5,
) -> None:
    """One-line ValueError starting with the EDM2Spec field name on a bad config."""
    levels = len(channel_mult)
    if not levels or img_resolution % (2 ** (levels - 1)) or img_resolution >> (levels - 1) < 1:
        raise ValueError(f"channel_mult: resolution {img_resolution} not divisible by 2^{max(levels - 1, 0)} ({levels} levels)")
    if (channels * channel_mult[0]) % 2:
        raise ValueError(f"channels: channels x channel_mult[0] = {channels * channel_mult[0]} must be even (sin/cos time embedding)")
    res = [img_resolution >> level for level in range(levels)]
    for name, wanted in (("attn_resolutions", attn_resolutions), ("dropout_resolutions", dropout_resolutions)):
        unreachable = sorted(set(wanted) - set(res), reverse=True)
        if unreachable:
            raise ValueError(f"{name}: {unreachable} never reached by the U-Net (its resolutions: {res})")
    for level, mult in enumerate(channel_mult):
        if res[level] in attn_resolutions or level == levels - 1:  # the first middle block always has attention
            num_heads(channels * mult, head_dim)
    for name, t in (("res_balance", res_balance), ("attn_balance", attn_balance), ("concat_balance", concat_balance),
                    ("label_balance", label_balance)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {t}")


class EDM2UNet(nn.Module):
    """F(x, c_noise, class_labels, dropout_key, guidance): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        *,
        channels: int = 192,
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        num_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (16, 8),
        head_dim: int = 64,
        emb_mult: int = 4,
        dropout: float = 0.0,
        dropout_resolutions: tuple[int, ...] = (),
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        concat_balance: float = 0.5,
        label_balance: float = 0.5,
        num_classes: int = 0,
        guidance_conditional: bool = False,
    ):
        super().__init__()
        channel_mult, attn_resolutions, dropout_resolutions = tuple(channel_mult), tuple(attn_resolutions), tuple(dropout_resolutions)
        check_config(img_resolution, channels, channel_mult, attn_resolutions, head_dim, dropout_resolutions,
                     res_balance, attn_balance, concat_balance, label_balance)
        cblock = [channels * m for m in channel_mult]
        cemb = channels * emb_mult
        self.concat_balance = concat_balance
        self.emb = EDM2Embedding(cblock[0], cemb, num_classes, label_balance, guidance_conditional)
        self.out_gain = nn.Parameter(torch.zeros([1]))  # F = 0 at init; 1-D, since FSDP2 refuses scalar parameters
        salt = itertools.count(1)  # a distinct dropout salt per block

        def block(cin: int, cout: int, res: int, flavor: Literal["enc", "dec"], resample: Literal["keep", "down", "up"] = "keep",
                  attention: bool = False) -> Block:
            p = dropout if not dropout_resolutions or res in dropout_resolutions else 0.0
            return Block(cin, cout, cemb, flavor=flavor, resolution=res, resample=resample,
                         heads=num_heads(cout, head_dim) if attention else 0, dropout=p, salt=next(salt),
                         res_balance=res_balance, attn_balance=attn_balance)

        self.conv_in = MPConv(img_channels + 1, cblock[0], 3)  # + the constant-ones channel
        self.enc = nn.ModuleList()
        cout = cblock[0]
        for level, c in enumerate(cblock):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(block(cout, cout, res, "enc", "down"))
            for _ in range(num_blocks):
                self.enc.append(block(cout, c, res, "enc", attention=res in attn_resolutions))
                cout = c
        skips = [cblock[0]] + [b.out_channels for b in self.enc]
        res = img_resolution >> (len(cblock) - 1)
        self.mid = nn.ModuleList([block(cout, cout, res, "dec", attention=True), block(cout, cout, res, "dec")])
        self.dec = nn.ModuleList()
        for level, c in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level < len(cblock) - 1:
                self.dec.append(block(cout, cout, res, "dec", "up"))
            for _ in range(num_blocks + 1):
                self.dec.append(block(cout + skips.pop(), c, res, "dec", attention=res in attn_resolutions))
                cout = c
        self.conv_out = MPConv(cout, img_channels, 3)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        dropout_key: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        emb = self.emb(c_noise, class_labels, guidance)  # float32 [B, emb_ch]
        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))  # constant-ones input channel (EDM2)
        skips = [x]
        for block in self.enc:
            x = block(x, emb, dropout_key)
            skips.append(x)
        for block in self.mid:
            x = block(x, emb, dropout_key)
        for block in self.dec:
            if block.resample != "up":
                x = mp_cat(x, skips.pop(), self.concat_balance)  # decoder skip (EDM2 Eq. 103)
            x = block(x, emb, dropout_key)
        return self.conv_out(x, gain=self.out_gain)  # learnable output gain, 0 at init

    @torch.no_grad()
    def renormalize_(self, apply: torch.Tensor | None = None) -> None:
        """Forced weight normalisation of every MP weight (EDM2 Eq. 66), in place; the train step calls it after
        each optimiser step (with the device's `apply` flag when the update was decided there). The function is
        unchanged: the forward normalises the weights anyway."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.renormalize_(apply)
