"""Experiment specs: a tree of frozen dataclasses and its JSON round trip. Data only.

A spec file `specs/NAME.py` defines `SPEC = Spec(...)`; `scm_graph.specfile` imports it and applies
command-line overrides (`--train.batch 64`). The *resolved* spec (shape fields filled from the shard
manifest by `scm_graph.data.manifest.resolve_spec`) is stored as JSON in every checkpoint, so a
checkpoint alone rebuilds its model. Each component reads its own section; the network's
per-architecture settings sit in `net.unet` and `net.dit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from scm_graph.checks import Check, field_problems
from scm_graph.errors import UserError

# Valid values, written next to each field below and checked by `validate` (see scm_graph.checks).
POSITIVE = Check(gt=0)
NON_NEGATIVE = Check(ge=0)
AT_LEAST_1 = Check(ge=1)
PLAIN_NAME = Check(pattern=r"(?!\.)[^/\\\x00-\x1f]+", means="a plain folder name (no slash or control character, not starting with a dot)")


@dataclass(frozen=True)
class DataSpec:
    name: Annotated[str, PLAIN_NAME] = "digits"
    """Shard set to read: `<root>/<name>/` (written by `python -m scm_graph.shard`)."""
    root: Annotated[str, Check(pattern=r".+", means="a folder")] = "shards"
    """Folder that holds the shard sets."""
    normalize: Literal["pixel", "channel"] = "pixel"
    """'pixel': uint8 -> [-1, 1]. 'channel': (x - mean) / std * sigma_d with the manifest's per-channel stats."""
    shuffle_buffer: Annotated[int, NON_NEGATIVE] = 2000
    """Samples in the shuffle buffer."""
    workers: Annotated[int, NON_NEGATIVE] = 0
    """DataLoader worker processes (0 reads in the training process)."""
    segment_images: Annotated[int, AT_LEAST_1] = 1 << 20
    """The stream is reseeded every this many images, which bounds the fast-forward on --resume."""
    resolution: Annotated[int, NON_NEGATIVE] = 0
    """Image side; 0 = take it from the manifest (the resolved spec always holds the real value)."""
    channels: Literal[0, 1, 3, 4] = 0
    """Image channels (4 for SD-VAE latents); 0 = take them from the manifest."""
    num_classes: Annotated[int, NON_NEGATIVE] = 0
    """Classes in the labels; 0 = from the manifest (0 there too means unlabelled)."""
    mean: tuple[float, ...] = ()
    """Per-channel mean in stored units; empty = from the manifest."""
    std: Annotated[tuple[float, ...], POSITIVE] = ()
    """Per-channel std in stored units; empty = from the manifest."""
    vae: str = ""
    """Latent shard sets: the SD-VAE (a diffusers AutoencoderKL folder) that decodes samples to images; empty = the one the manifest records. Pixel sets: empty."""
    posterior: bool = True
    """Latent sets that store the VAE posterior's mean and std: each training latent is a draw mean + std * eps (EDM2); False trains on the mean."""


@dataclass(frozen=True)
class UNetSpec:
    """The DDPM++-style U-Net (`scm_graph.nets.unet`); read only when `net.arch` is 'unet'."""

    channels: Annotated[int, AT_LEAST_1] = 128
    """Base channel count (DDPM++ CIFAR-10: 128)."""
    channel_mult: Annotated[tuple[int, ...], Check(ge=1, nonempty=True)] = (2, 2, 2)
    """Channel multiplier per resolution level (DDPM++ CIFAR-10: 2 2 2)."""
    num_blocks: Annotated[int, AT_LEAST_1] = 4
    """Residual blocks per resolution level (DDPM++ CIFAR-10: 4)."""
    attn_resolutions: Annotated[tuple[int, ...], AT_LEAST_1] = ()
    """Resolutions with self-attention after each residual block (DDPM++ CIFAR-10: 16; EDM2: 16 8); non-empty also puts one in the middle."""
    head_dim: Annotated[int, AT_LEAST_1] = 64
    """Attention head width: heads = channels at that level // head_dim."""
    norm_groups: Annotated[int, AT_LEAST_1] = 32
    """Group-norm groups (capped at channels // 4)."""
    emb_mult: Annotated[int, AT_LEAST_1] = 4
    """Time-embedding width as a multiple of `channels`."""


@dataclass(frozen=True)
class DiTSpec:
    """The DiT transformer on patches (`scm_graph.nets.dit`); read only when `net.arch` is 'dit'."""

    width: Annotated[int, AT_LEAST_1] = 384
    """Token width (DiT-S: 384)."""
    depth: Annotated[int, AT_LEAST_1] = 12
    """Transformer blocks (DiT-S: 12)."""
    patch_size: Annotated[int, AT_LEAST_1] = 2
    """Patch side; the image resolution must be divisible by it."""
    head_dim: Annotated[int, AT_LEAST_1] = 64
    """Attention head width: heads = width // head_dim."""
    mlp_ratio: Annotated[float, POSITIVE] = 4.0
    """MLP hidden width as a multiple of `width`."""
    emb_mult: Annotated[int, AT_LEAST_1] = 1
    """Time-embedding width as a multiple of `width`."""


@dataclass(frozen=True)
class EDM2Spec:
    """The EDM2 U-Net (Karras et al. 2024) with the sCM changes (`scm_graph.nets.edm2`); read only when `net.arch` is 'edm2'."""

    channels: Annotated[int, AT_LEAST_1] = 192
    """Base channel count (EDM2 S 192, M 256, L 320, XL 384, XXL 448)."""
    channel_mult: Annotated[tuple[int, ...], Check(ge=1, nonempty=True)] = (1, 2, 3, 4)
    """Channel multiplier per resolution level (EDM2: 1 2 3 4)."""
    num_blocks: Annotated[int, AT_LEAST_1] = 3
    """Residual blocks per resolution level (EDM2: 3)."""
    attn_resolutions: Annotated[tuple[int, ...], AT_LEAST_1] = (16, 8)
    """Resolutions whose blocks have self-attention (EDM2: 16 8); the middle block always has it."""
    head_dim: Annotated[int, AT_LEAST_1] = 64
    """Attention head width: heads = channels at that level // head_dim (EDM2: 64)."""
    emb_mult: Annotated[int, AT_LEAST_1] = 4
    """Embedding width as a multiple of `channels` (EDM2: max(channel_mult) = 4)."""
    dropout_resolutions: Annotated[tuple[int, ...], AT_LEAST_1] = ()
    """Resolutions whose blocks apply net.dropout; empty = every block (sCT ImageNet 64: 16 8, i.e. <= 16)."""
    res_balance: Annotated[float, Check(ge=0, le=1)] = 0.3
    """Magnitude-preserving sum weight of the residual branch (EDM2: 0.3)."""
    attn_balance: Annotated[float, Check(ge=0, le=1)] = 0.3
    """Magnitude-preserving sum weight of the attention branch (EDM2: 0.3)."""
    concat_balance: Annotated[float, Check(ge=0, le=1)] = 0.5
    """Magnitude-preserving concatenation weight of the decoder's skip connections (EDM2: 0.5)."""
    label_balance: Annotated[float, Check(ge=0, le=1)] = 0.5
    """Magnitude-preserving sum weight of the class embedding against the time embedding (EDM2: 0.5)."""


@dataclass(frozen=True)
class NetSpec:
    arch: Literal["unet", "dit", "edm2"] = "unet"
    """Backbone: 'unet' (DDPM++, settings in net.unet), 'edm2' (EDM2's U-Net, net.edm2) or 'dit' (net.dit); all with positional time embedding and adaptive double normalisation."""
    dropout: Annotated[float, Check(ge=0, lt=1)] = 0.0
    """Dropout probability inside residual blocks (U-Net) or MLPs (DiT)."""
    class_conditional: bool = False
    """Condition on the class label (needs labelled shards)."""
    time_scale: Annotated[float, POSITIVE] = 1.0
    """Scale s of the time input: the network and w_phi see c_noise(t) = s t, t in [0, pi/2] (sCM: 1; DDPM-style embeddings: 1000)."""
    unet: UNetSpec = field(default_factory=UNetSpec)
    dit: DiTSpec = field(default_factory=DiTSpec)
    edm2: EDM2Spec = field(default_factory=EDM2Spec)


# The flat NetSpec fields of scm_graph 0.1 (spec JSON in older checkpoints, old CLI flags) and where
# each lives now; `spec_from_json` maps old JSON, `scm_graph.specfile` names the new flag.
LEGACY_NET_FIELDS: dict[str, tuple[str, ...]] = {
    "channels": ("unet.channels", "dit.width"),
    "channel_mult": ("unet.channel_mult",),
    "num_blocks": ("unet.num_blocks",),
    "attn_resolutions": ("unet.attn_resolutions",),
    "norm_groups": ("unet.norm_groups",),
    "head_dim": ("unet.head_dim", "dit.head_dim"),
    "emb_mult": ("unet.emb_mult", "dit.emb_mult"),
    "patch_size": ("dit.patch_size",),
    "depth": ("dit.depth",),
    "mlp_ratio": ("dit.mlp_ratio",),
}


@dataclass(frozen=True)
class ObjectiveSpec:
    kind: Literal["sct", "scd", "diffusion", "discrete", "ict"] = "sct"
    """'sct': continuous-time consistency training (Algorithm 1); 'scd': its distillation of a diffusion teacher (objective.teacher); 'diffusion': TrigFlow diffusion (Eq. 4); 'discrete': sCT with the network's time derivative replaced by a finite difference over a grid of objective.N steps (sCM Fig. 5c); 'ict': discrete-time consistency training as iCT (Song & Dhariwal 2023: EDM parameterisation, Karras grid, Pseudo-Huber, doubling curriculum)."""
    sigma_d: Annotated[float, POSITIVE] = 0.5
    """Data standard deviation sigma_d."""
    P_mean: float = -1.0
    """Mean of the log-normal time proposal, tau ~ N(P_mean, P_std^2), sigma = e^tau ('ict': of the discretised index distribution; iCT: -1.1)."""
    P_std: Annotated[float, POSITIVE] = 1.4
    """Std of the log-normal time proposal."""
    tangent_c: Annotated[float, NON_NEGATIVE] = 0.1
    """Tangent normalisation constant c in g / (||g|| + c)."""
    tangent_clip: bool = False
    """Clip the tangent to [-1, 1] instead of normalising it."""
    tangent_normalize: bool = True
    """Normalise the tangent, g / (||g|| + c); False (and tangent_clip False) trains on the raw tangent (sCM Fig. 5a)."""
    N: Annotated[int, AT_LEAST_1] = 160
    """'discrete': grid steps over [0, t_max]; the finite difference spans one step, t_max / N (sCM Fig. 5c: 10 to 1280)."""
    ict_steps: Annotated[tuple[int, int], AT_LEAST_1] = (10, 1280)
    """'ict': the curriculum's first and last grid sizes s0, s1: N(k) = min(s0 2^floor(k / K'), s1) + 1 (iCT Sec. 3.3)."""
    ict_huber: Annotated[float, POSITIVE] = 0.00054
    """'ict': the Pseudo-Huber constant per sqrt(D), c = ict_huber sqrt(D) (iCT Sec. 3.3)."""
    warmup_images: Annotated[int, NON_NEGATIVE] = 5_120_000
    """Tangent warmup: r grows linearly 0 -> 1 over this many images (paper: 10k iterations x 512)."""
    adaptive_weighting: bool = True
    """Learn w_phi(t) jointly (Eq. 8); off = unit weighting."""
    fused_pass: Literal["auto", "on", "off"] = "auto"
    """sCT / sCD in one process: take F_theta for the gradient from the JVP's own primal output (one forward fewer; the same gradient) 'on', or run a separate gradient pass 'off'; 'auto': on except on the CPU. Under torchrun the passes are always separate."""
    teacher: str = ""
    """sCD: the teacher, a diffusion checkpoint of ours ('trigflow') or the weights (.safetensors) of an EDM denoiser ('edm')."""
    teacher_kind: Literal["trigflow", "edm"] = "trigflow"
    """sCD: 'trigflow' = a diffusion checkpoint written by scm_graph; 'edm' = an EDM-parameterised denoiser D(x, sigma, labels) built by teacher_factory (scm_graph.teacher)."""
    teacher_factory: str = ""
    """sCD with an 'edm' teacher: 'path/to/file.py:function' returning the denoiser module (weights from objective.teacher)."""
    init_from_teacher: bool = True
    """sCD: start the student from the teacher's EMA weights (diffusion finetuning, as the paper; a 'trigflow' teacher with the student's network)."""
    guidance: Annotated[tuple[float, float], Check(ge=0)] = (1.0, 2.0)
    """sCD of a class-conditional teacher: the student takes the CFG scale s as an input, s ~ U[guidance] in training (paper: [1, 2])."""
    label_dropout: Annotated[float, Check(ge=0, lt=1)] = 0.1
    """Class-conditional diffusion: probability that a sample's label is replaced by the null class, so the model also learns the unconditional velocity classifier-free guidance needs (ignored by other objectives)."""


@dataclass(frozen=True)
class OptimSpec:
    kind: Literal["adam", "radam"] = "radam"
    """Optimiser."""
    lr: Annotated[float, NON_NEGATIVE] = 1e-4
    """Learning rate (constant; 0 leaves the weights as they are, e.g. to test an init)."""
    betas: Annotated[tuple[float, float], Check(ge=0, lt=1)] = (0.9, 0.99)
    """Adam betas."""
    eps: Annotated[float, POSITIVE] = 1e-8
    """Adam epsilon."""
    grad_clip: Annotated[float, NON_NEGATIVE] = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    lr_rampup_images: Annotated[int, NON_NEGATIVE] = 0
    """Linear learning-rate warmup from 0 over this many images (EDM2: 10 Mimg); 0 = none."""
    lr_decay_images: Annotated[int, NON_NEGATIVE] = 0
    """Inverse-square-root decay, lr / sqrt(max(images / lr_decay_images, 1)) (EDM2: 70k steps x batch at 512, 35k x batch at 64); 0 = constant."""


@dataclass(frozen=True)
class TrainSpec:
    batch: Annotated[int, AT_LEAST_1] = 512
    """Images per step: the global batch, over all processes and micro-batches."""
    total_images: Annotated[int, AT_LEAST_1] = 200_000_000
    """Training length in images."""
    ema_halflife_images: Annotated[float, NON_NEGATIVE] = 500_000.0
    """EMA half-life in images (paper CIFAR-10: 0.5 Mimg); 0 = no averaging (the EMA equals the weights)."""
    ema_rampup: Annotated[float, NON_NEGATIVE] = 0.0
    """If > 0, the half-life is at most this fraction of the images seen so far (EDM's ramp-up)."""
    seed: Annotated[int, Check(ge=0, lt=2**31)] = 0
    """Seed for weights, noise, dropout and the data stream."""
    compile: Annotated[bool, tyro.conf.arg(aliases=("--compile",))] = True
    """Compile the train step with torch.compile (False runs the same code eagerly). Alias: --compile."""
    device: Annotated[str, Check(pattern=r"auto|cpu|mps|cuda(:[0-9]+)?", means="auto, cpu, mps, cuda or cuda:N")] = "auto"
    """'auto' (cuda if present), 'cpu' or 'cuda[:i]'."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the train step; fp16 uses a dynamic loss scaler. Weights and optimiser state stay fp32."""
    init_from: str = ""
    """Initialise the network (and w_phi) from this checkpoint's EMA weights, e.g. a diffusion teacher."""
    out: str = ""
    """Run folder; empty = runs/<name>."""
    log_every_images: Annotated[int, NON_NEGATIVE] = 51_200
    """Images between JSONL metric lines (0 = only at the end)."""
    sample_every_images: Annotated[int, NON_NEGATIVE] = 5_120_000
    """Images between sample grids (one is always made at the end)."""
    grid_samples: Annotated[int, AT_LEAST_1] = 64
    """Samples in each grid (2-step consistency or 18-step Heun samples, decoded by the VAE for latent runs)."""
    ckpt_every_images: Annotated[int, NON_NEGATIVE] = 5_120_000
    """Images between checkpoints (one is always written at the end)."""
    eval_every_images: Annotated[int, NON_NEGATIVE] = 0
    """Images between evaluations (1- and 2-step samples; 32-step Heun for diffusion) of the EMA; 0 = only at the end."""
    eval_samples: Annotated[int, Check(ge=2)] = 1797
    """Samples per evaluation (the budget: the papers use 50000 for FID)."""
    eval_t_mid: Annotated[float, POSITIVE] = 1.1
    """Intermediate time t_mid of the 2-step samples in grids and evaluations, 0 < t_mid < t_max (sCM: 1.1); the sample / eval CLIs' default for this checkpoint."""
    eval_metrics: tuple[Literal["fd_digits", "fid", "fd_dinov2"], ...] = ()
    """Metrics of each evaluation; empty = fd_digits for the 8x8 digits, none otherwise. fid / fd_dinov2 need train.eval_ref."""
    eval_ref: str = ""
    """Reference statistics (.npz from `python -m scm_graph.eval ref`, or clean-fid's for fid)."""
    eval_inception: str = ""
    """Folder holding clean-fid's inception-2015-12-05.pt (fid); empty = clean-fid's /tmp."""
    eval_dinov2: str = ""
    """A local clone of facebookresearch/dinov2 holding dinov2_vitl14_pretrain.pth (fd_dinov2)."""
    keep_best: str = ""
    """An eval key (fid_2step, fd_1step, fd_dinov2_heun32, ...): keep the checkpoint with its lowest value as best.safetensors; empty = none."""
    time_limit_s: Annotated[float, NON_NEGATIVE] = 0.0
    """Stop (and checkpoint) after this many seconds of training; 0 = no limit."""
    keep_last: Annotated[int, AT_LEAST_1] = 1
    """Checkpoints kept on disk: ckpt.safetensors is always the newest; with K > 1 the K newest are also kept as checkpoints/ckpt-<images>.safetensors (older ones are deleted)."""
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """'bar': a live progress bar; 'lines': a plain line every progress_every_s (logs, nohup, CI); 'auto': bar on a terminal, lines otherwise."""
    progress_every_s: Annotated[float, POSITIVE] = 30.0
    """Seconds between plain progress lines."""
    accum: Annotated[int, AT_LEAST_1] = 1
    """Micro-batches per step (gradient accumulation): each process runs batch / (processes x accum) samples at a time."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' replicates the network on every process; 'fsdp' shards weights, gradients and optimiser state (FSDP2 fully_shard)."""
    dist_timeout_s: Annotated[float, POSITIVE] = 600.0
    """Under torchrun: seconds a process waits for the others in a collective before the job stops."""


@dataclass(frozen=True)
class Spec:
    name: Annotated[str, PLAIN_NAME] = "run"
    """Experiment name (the default run folder is runs/<name>)."""
    data: DataSpec = field(default_factory=DataSpec)
    net: NetSpec = field(default_factory=NetSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)


# ---------------------------------------------------------------------------------------------
# JSON round trip (for checkpoint metadata)


def spec_to_json(spec: Spec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a dataclass (nested ones too) from `asdict` output; lists become tuples, unknown keys are ignored."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue  # written before the field existed: its default
        v = d[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            v = _from_dict(hints[f.name], v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def _upgrade_net(net: dict[str, Any]) -> dict[str, Any]:
    """A flat 0.1 `net` section -> the nested one (fields it lacks keep today's defaults)."""
    if not any(k in net for k in LEGACY_NET_FIELDS):
        return net
    out: dict[str, Any] = {k: v for k, v in net.items() if k not in LEGACY_NET_FIELDS}
    for old, news in LEGACY_NET_FIELDS.items():
        if old in net:
            for new in news:
                arch, name = new.split(".")
                out.setdefault(arch, {})[name] = net[old]
    return out


# Fields whose value was fixed before they existed: a spec written without one had this value, not today's default.
LEGACY_VALUES: dict[tuple[str, str], Any] = {("objective", "label_dropout"): 0.0}


def spec_from_json(text: str) -> Spec:
    d = json.loads(text)
    if isinstance(d.get("net"), dict):
        d["net"] = _upgrade_net(d["net"])
    for (section, name), value in LEGACY_VALUES.items():
        if isinstance(d.get(section), dict):
            d[section].setdefault(name, value)
    return _from_dict(Spec, d)


def distils_guidance(spec: Spec) -> bool:
    """sCD of a class-conditional teacher: the student takes the CFG scale s as an input (sCM Sec. 6)."""
    return spec.objective.kind == "scd" and spec.net.class_conditional


def validate(spec: Spec) -> None:
    """Every field against the valid values written next to it, then the few rules that join fields;
    the first problem is a one-line UserError (network shapes are checked where networks are built)."""
    problems = field_problems(spec)
    o = spec.objective
    if not problems and o.guidance[0] > o.guidance[1]:
        problems.append(f"objective.guidance must be (low, high) with low <= high, not {o.guidance}")
    if not problems and o.kind == "scd" and not o.teacher:
        problems.append("objective.kind 'scd' needs a teacher: set objective.teacher to its checkpoint")
    if not problems and o.kind == "scd" and o.teacher_kind == "edm" and not o.teacher_factory:
        problems.append("objective.teacher_kind 'edm' needs objective.teacher_factory ('file.py:function' building the denoiser)")
    if not problems and o.kind == "scd" and o.teacher_kind == "edm" and o.init_from_teacher and not spec.train.init_from:
        problems.append("an 'edm' teacher's network is not the student's: set objective.init_from_teacher false "
                        "(or train.init_from a checkpoint of the student's network)")
    if not problems and o.ict_steps[0] > o.ict_steps[1]:
        problems.append(f"objective.ict_steps must be (s0, s1) with s0 <= s1, not {o.ict_steps}")
    if not problems and spec.train.eval_t_mid >= (t_max := math.atan(80.0 / o.sigma_d)):  # trigflow.t_max: arctan(sigma_max / sigma_d)
        problems.append(f"train.eval_t_mid must be below t_max = arctan(80 / objective.sigma_d) = {t_max:.4f}, "
                        f"not {spec.train.eval_t_mid}")
    if not problems and spec.train.batch % spec.train.accum:
        problems.append(f"train.batch {spec.train.batch} does not divide into train.accum {spec.train.accum} micro-batches")
    d = spec.data
    for stat in ("mean", "std"):
        values = getattr(d, stat, ())
        if problems or not isinstance(values, tuple):  # a rule joining fields needs each of them valid first
            break
        if values and d.channels and len(values) != d.channels:
            problems.append(f"data.{stat} needs one value per channel ({d.channels}), not {len(values)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
