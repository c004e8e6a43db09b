"""The conditioning embedding shared by the U-Net and the DiT: time c_noise(t), class label, CFG scale.

emb = silu(fc1(silu(fc0(pos(c_noise) + label(one_hot(y)) + guidance(pos(s)))))), computed in float32
even under autocast (docs/design.md, "Mixed precision"). Time enters through a positional embedding
of c_noise(t) = t, not large Fourier features (sCM Sec. 4.1); `net.time_scale` makes it time_scale * t,
applied by `scm_graph.model` before the backbone (the CFG-scale input is not scaled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scm_graph.precision import fp32_region


def class_one_hot(class_labels: Tensor | None, num_classes: int) -> Tensor:
    """[B] integer labels -> [B, num_classes] one-hot (int64); label -1 (any negative) is the null class of
    classifier-free guidance, a zero one-hot, as EDM2 does. ValueError when the labels are missing. A label of
    num_classes or more also gives a zero row (no check inside the compiled step): the data checks labels against
    the shards' classes and `resolve_spec` the spec's against the shards'."""
    if class_labels is None:
        raise ValueError("this network is class-conditional: pass class_labels")
    known = (class_labels >= 0).unsqueeze(1)  # a negative label is the null class (CFG): a zero one-hot
    classes = torch.arange(num_classes, device=class_labels.device)
    # F.one_hot's value, by comparison: torch 2.11 cannot compile F.one_hot's data-dependent range check (fullgraph)
    return (class_labels.clamp(min=0).unsqueeze(1) == classes).long() * known


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


class ConditionEmbedding(nn.Module):
    """[B] c_noise (+ [B] labels, + [B] guidance scale) -> [B, emb_channels] float32 embedding.

    `num_classes > 0` adds a class input (one-hot through a bias-free linear layer; label -1 is the null
    class of classifier-free guidance, a zero one-hot, as EDM2 does); `guidance` adds
    the CFG-scale input s of guided distillation (sCM Sec. 6, after Meng et al. 2023), zero-initialised
    so a network gains it without changing its output.
    """

    def __init__(self, channels: int, emb_channels: int, num_classes: int = 0, guidance: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.noise = PositionalEmbedding(channels)
        self.label = nn.Linear(num_classes, channels, bias=False) if num_classes else None
        self.guidance = nn.Linear(channels, channels) if guidance else None
        if self.guidance is not None:
            nn.init.zeros_(self.guidance.weight)
            nn.init.zeros_(self.guidance.bias)
        self.fc0 = nn.Linear(channels, emb_channels)
        self.fc1 = nn.Linear(emb_channels, emb_channels)

    def forward(self, c_noise: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        with fp32_region(c_noise):  # t and the time embedding stay float32 under autocast
            emb = self.noise(c_noise)
            if self.label is not None:
                emb = emb + self.label(class_one_hot(class_labels, self.num_classes).to(emb.dtype))
            if self.guidance is not None:
                if guidance is None:
                    raise ValueError("this network is guidance-conditional: pass guidance (the CFG scale s, shape [B])")
                emb = emb + self.guidance(self.noise(guidance))  # the CFG scale s as an extra input (sCM Sec. 6)
            return F.silu(self.fc1(F.silu(self.fc0(emb))))
