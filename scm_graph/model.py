"""The trained module: network F_theta plus the adaptive weighting w_phi(t), built from a spec.

`TrigFlowModel.forward(x_in, t, labels, dropout_key)` returns F_theta(x_t / sigma_d, c_noise(t));
callers pass x_in = x_t / sigma_d. `w_phi` is a separate submodule, never inside the JVP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scm_graph import trigflow
from scm_graph.nets.dit import DiT
from scm_graph.nets.layers import PositionalEmbedding
from scm_graph.nets.unet import UNet
from scm_graph.spec import Spec


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear layer on a positional embedding of c_noise(t), zero-initialised (EDM2 style)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.emb = PositionalEmbedding(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear(self.emb(trigflow.c_noise(t))).squeeze(1)


class TrigFlowModel(nn.Module):
    def __init__(self, net: nn.Module, w_phi: AdaptiveWeight):
        super().__init__()
        self.net = net
        self.w_phi = w_phi

    def forward(self, x_in: Tensor, t: Tensor, labels: Tensor | None = None, dropout_key: Tensor | None = None) -> Tensor:
        return self.net(x_in, trigflow.c_noise(t), labels, dropout_key)


def build_model(spec: Spec) -> TrigFlowModel:
    """Build from a *resolved* spec (data shape fields filled); `spec.net.arch` picks the backbone."""
    d, n = spec.data, spec.net
    if not d.resolution or not d.channels:
        raise ValueError("build_model needs a resolved spec (data.resolution / data.channels)")
    num_classes = d.num_classes if n.class_conditional else 0
    net: nn.Module
    if n.arch == "dit":
        net = DiT(
            d.resolution,
            d.channels,
            width=n.channels,
            depth=n.depth,
            patch_size=n.patch_size,
            head_dim=n.head_dim,
            mlp_ratio=n.mlp_ratio,
            dropout=n.dropout,
            emb_mult=n.emb_mult,
            num_classes=num_classes,
            guidance_conditional=False,  # sCD (which supplies the guidance scale) is not built yet
        )
    elif n.arch == "unet":
        net = UNet(
            d.resolution,
            d.channels,
            channels=n.channels,
            channel_mult=tuple(n.channel_mult),
            num_blocks=n.num_blocks,
            dropout=n.dropout,
            emb_mult=n.emb_mult,
            num_classes=num_classes,
            norm_groups=n.norm_groups,
            attn_resolutions=tuple(n.attn_resolutions),
            head_dim=n.head_dim,
        )
    else:
        raise ValueError(f"unknown net.arch {n.arch!r}: expected 'unet' or 'dit'")
    return TrigFlowModel(net, AdaptiveWeight())


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def copy_params(dst: nn.Module, src: dict[str, Tensor]) -> None:
    """Load `src` into `dst` by name; one-line ValueError listing what does not match."""
    own = dict(dst.named_parameters())
    missing = sorted(set(own) - set(src))
    bad = [k for k in own if k in src and own[k].shape != src[k].shape]
    if missing or bad:
        what = (missing or bad)[:3]
        raise ValueError(f"weights do not match this network ({len(missing)} missing, {len(bad)} mis-shaped, e.g. {what})")
    for k, p in own.items():
        p.copy_(src[k])
