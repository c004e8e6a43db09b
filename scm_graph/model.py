"""The trained module: the TrigFlow parameterisation around a backbone, plus the adaptive weighting w_phi(t).

`TrigFlowModel` owns sigma_d and the input scaling, as EDM2's `Precond` does: callers pass x_t and t,
and `model(x_t, t, labels, dropout_key)` returns F_theta(x_t / sigma_d, c_noise(t)) (sCM Sec. 3 and 4.1).
The backbone (`scm_graph.nets`) only ever sees the unit-variance input and c_noise(t) = s t, s = `net.time_scale`
(1 by default); w_phi sees the same c_noise. `w_phi` is a separate submodule, never inside the JVP.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from scm_graph import trigflow
from scm_graph.errors import UserError
from scm_graph.nets.dit import DiT
from scm_graph.nets.dit import check_config as check_dit
from scm_graph.nets.edm2 import EDM2UNet
from scm_graph.nets.edm2 import check_config as check_edm2
from scm_graph.nets.embedding import PositionalEmbedding
from scm_graph.nets.unet import UNet
from scm_graph.nets.unet import check_config as check_unet
from scm_graph.precision import fp32_region
from scm_graph.spec import Spec, distils_guidance


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear layer on a positional embedding of c_noise(t), zero-initialised (EDM2 style; sCM Eq. 8).

    `time_scale` is the network's (c_noise(t) = s t): w_phi resolves t as finely as the network does, and EDM2
    feeds its log-variance head the network's c_noise too (docs/design.md, "Time embedding scale").
    """

    def __init__(self, channels: int = 128, time_scale: float = 1.0):
        super().__init__()
        self.time_scale = float(time_scale)
        self.emb = PositionalEmbedding(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear(self.emb(trigflow.c_noise(t, self.time_scale))).squeeze(1)


class TrigFlowModel(nn.Module):
    """F_theta(x_t / sigma_d, c_noise(t), cond) around `net`; `sigma_d` and `time_scale` (c_noise(t) = s t) are
    constants of the model."""

    def __init__(self, net: nn.Module, w_phi: AdaptiveWeight, sigma_d: float, time_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.w_phi = w_phi
        self.sigma_d = float(sigma_d)
        self.time_scale = float(time_scale)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, dropout_key: Tensor | None = None,
                guidance: Tensor | None = None, weight: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """F_theta(x_t / sigma_d, c_noise(t), labels, s); `guidance` ([B] CFG scales) only for a guidance-distilled student.

        `weight=True` returns (F, w_phi(t)): one forward of a wrapped (DDP / FSDP) model that uses every weight.
        """
        c = trigflow.c_noise(t, self.time_scale)  # c_noise(t) = s t; the CFG scale `guidance` is not scaled
        F = self.net(x_t / self.sigma_d, c, labels, dropout_key, guidance)  # F_theta(x_t / sigma_d, c_noise(t))
        if not weight:
            return F
        with fp32_region(t):
            return F, self.w_phi(t).clone()  # w_phi(t), float32 (a time-embedding path); not a view (FSDP2's hooks)

    @property
    def takes_guidance(self) -> bool:
        """Whether the network takes the CFG scale s as an input (a guidance-distilled sCD student)."""
        return getattr(self.net.emb, "guidance", None) is not None


# Network fields that may be empty or zero (the rest must be positive).
OPTIONAL_FIELDS = ("attn_resolutions", "dropout_resolutions", "res_balance", "attn_balance", "concat_balance", "label_balance")


def check_net(spec: Spec) -> None:
    """The network's shape checks for this spec, as one-line UserErrors naming the field (`net.unet.head_dim: ...`).

    U-Net levels (DDPM++ and EDM2) depend on the image resolution, so they are checked once the spec is resolved
    (resolution 0 skips them); `build_model` runs the same checks.
    """
    n, resolution = spec.net, spec.data.resolution
    for name, value in dataclasses.asdict(getattr(n, n.arch)).items():
        values = value if isinstance(value, tuple) else (value,)
        if name not in OPTIONAL_FIELDS and not (values and all(v > 0 for v in values)):
            raise UserError(f"net.{n.arch}.{name} must be positive, got {value}")
    try:
        if n.arch == "dit":
            check_dit(resolution, n.dit.width, n.dit.patch_size, n.dit.head_dim)
        elif n.arch == "edm2" and resolution:
            u = n.edm2
            check_edm2(resolution, u.channels, u.channel_mult, u.attn_resolutions, u.head_dim, u.dropout_resolutions,
                       u.res_balance, u.attn_balance, u.concat_balance, u.label_balance)
        elif n.arch == "unet" and resolution:
            check_unet(resolution, n.unet.channels, n.unet.channel_mult, n.unet.attn_resolutions, n.unet.head_dim)
    except ValueError as e:  # the nets name the field: "head_dim: ..."
        raise UserError(f"net.{n.arch}.{e}") from None


def build_model(spec: Spec) -> TrigFlowModel:
    """Build from a *resolved* spec (data shape fields filled); `spec.net.arch` picks the backbone."""
    d, n = spec.data, spec.net
    if not d.resolution or not d.channels:
        raise ValueError("build_model needs a resolved spec (data.resolution / data.channels)")
    check_net(spec)
    num_classes = d.num_classes if n.class_conditional else 0
    common = dict(dropout=n.dropout, num_classes=num_classes, guidance_conditional=distils_guidance(spec))
    net: nn.Module
    if n.arch == "dit":
        net = DiT(d.resolution, d.channels, **dataclasses.asdict(n.dit), **common)
    elif n.arch == "unet":
        net = UNet(d.resolution, d.channels, **dataclasses.asdict(n.unet), **common)
    elif n.arch == "edm2":
        net = EDM2UNet(d.resolution, d.channels, **dataclasses.asdict(n.edm2), **common)
    else:
        raise ValueError(f"unknown net.arch {n.arch!r}: expected 'unet', 'edm2' or 'dit'")
    return TrigFlowModel(net, AdaptiveWeight(time_scale=n.time_scale), spec.objective.sigma_d, n.time_scale)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Parameters a student may lack in its teacher's weights: zero-initialised, so the student starts as the teacher.
ZERO_INIT_EXTRAS = ("net.emb.guidance.",)


@torch.no_grad()
def copy_params(dst: nn.Module, src: dict[str, Tensor], allow_missing: tuple[str, ...] = ()) -> None:
    """Load `src` into `dst` by name; one-line ValueError listing what does not match. Parameters whose
    names start with one of `allow_missing` may be absent from `src` and keep their values."""
    own = dict(dst.named_parameters())
    missing = sorted(k for k in set(own) - set(src) if not k.startswith(allow_missing))
    bad = [k for k in own if k in src and own[k].shape != src[k].shape]
    if missing or bad:
        what = (missing or bad)[:3]
        raise ValueError(f"weights do not match this network ({len(missing)} missing, {len(bad)} mis-shaped, e.g. {what})")
    for k, p in own.items():
        if k in src:
            p.copy_(src[k])
