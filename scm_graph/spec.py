"""Experiment specs: a tree of frozen dataclasses, built in `specs/NAME.py`, overridden from the CLI.

A spec file defines `SPEC = Spec(...)`. `load_spec(path, overrides)` imports it and applies tyro
overrides (`--train.batch 64`). The *resolved* spec (shape fields filled from the shard manifest) is
stored as JSON in every checkpoint, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from scm_graph.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    """Shard set to read: `<root>/<name>/` (written by `python -m scm_graph.shard`)."""
    root: str = "shards"
    """Folder that holds the shard sets."""
    normalize: Literal["pixel", "channel"] = "pixel"
    """'pixel': uint8 -> [-1, 1]. 'channel': (x - mean) / std * sigma_d with the manifest's per-channel stats."""
    shuffle_buffer: int = 2000
    """Samples in the shuffle buffer."""
    workers: int = 0
    """DataLoader worker processes (0 reads in the training process)."""
    segment_images: int = 1 << 20
    """The stream is reseeded every this many images, which bounds the fast-forward on --resume."""
    resolution: int = 0
    """Image side; 0 = take it from the manifest (the resolved spec always holds the real value)."""
    channels: int = 0
    """Image channels; 0 = take them from the manifest."""
    num_classes: int = 0
    """Classes in the labels; 0 = from the manifest (0 there too means unlabelled)."""
    mean: tuple[float, ...] = ()
    """Per-channel mean in stored units; empty = from the manifest."""
    std: tuple[float, ...] = ()
    """Per-channel std in stored units; empty = from the manifest."""


@dataclass(frozen=True)
class NetSpec:
    arch: Literal["unet", "dit"] = "unet"
    """Backbone: 'unet' (DDPM++-style U-Net) or 'dit' (DiT transformer on patches); both with positional time embedding and adaptive double normalisation."""
    channels: int = 128
    """Base channel count (DDPM++ CIFAR-10: 128); the token width for the DiT."""
    channel_mult: tuple[int, ...] = (2, 2, 2)
    """Channel multiplier per resolution level (DDPM++ CIFAR-10: 2 2 2). U-Net only."""
    num_blocks: int = 4
    """Residual blocks per resolution level (DDPM++ CIFAR-10: 4). U-Net only."""
    attn_resolutions: tuple[int, ...] = ()
    """U-Net resolutions with self-attention after each residual block (DDPM++ CIFAR-10: 16; EDM2: 16 8); non-empty also puts one in the middle."""
    dropout: float = 0.0
    """Dropout probability inside residual blocks."""
    emb_mult: int = 4
    """Time-embedding width as a multiple of `channels`."""
    class_conditional: bool = False
    """Condition on the class label (needs labelled shards)."""
    norm_groups: int = 32
    """Group-norm groups (capped at channels // 4). U-Net only."""
    head_dim: int = 64
    """Attention head width (U-Net attention blocks and DiT): heads = width // head_dim."""
    patch_size: int = 2
    """DiT patch side; the image resolution must be divisible by it."""
    depth: int = 12
    """DiT transformer blocks."""
    mlp_ratio: float = 4.0
    """DiT MLP hidden width as a multiple of the token width (channels)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    kind: Literal["sct", "diffusion"] = "sct"
    """'sct': continuous-time consistency training (Algorithm 1); 'diffusion': TrigFlow diffusion (Eq. 4)."""
    sigma_d: float = 0.5
    """Data standard deviation sigma_d."""
    P_mean: float = -1.0
    """Mean of the log-normal time proposal, tau ~ N(P_mean, P_std^2)."""
    P_std: float = 1.4
    """Std of the log-normal time proposal."""
    tangent_c: float = 0.1
    """Tangent normalisation constant c in g / (||g|| + c)."""
    tangent_clip: bool = False
    """Clip the tangent to [-1, 1] instead of normalising it."""
    warmup_images: int = 5_120_000
    """Tangent warmup: r grows linearly 0 -> 1 over this many images (paper: 10k iterations x 512)."""
    adaptive_weighting: bool = True
    """Learn w_phi(t) jointly (Eq. 8); off = unit weighting."""


@dataclass(frozen=True)
class OptimSpec:
    kind: Literal["adam", "radam"] = "radam"
    """Optimiser."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""


@dataclass(frozen=True)
class TrainSpec:
    batch: int = 512
    """Images per step."""
    total_images: int = 200_000_000
    """Training length in images."""
    ema_halflife_images: float = 500_000.0
    """EMA half-life in images (paper CIFAR-10: 0.5 Mimg)."""
    ema_rampup: float = 0.0
    """If > 0, the half-life is at most this fraction of the images seen so far (EDM's ramp-up)."""
    seed: int = 0
    """Seed for weights, noise, dropout and the data stream."""
    compile: Annotated[bool, tyro.conf.arg(aliases=("--compile",))] = True
    """Compile the train step with torch.compile (False runs the same code eagerly). Alias: --compile."""
    device: str = "auto"
    """'auto' (cuda if present), 'cpu' or 'cuda[:i]'."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the train step; fp16 uses a dynamic loss scaler. Weights and optimiser state stay fp32."""
    init_from: str = ""
    """Initialise the network (and w_phi) from this checkpoint's EMA weights, e.g. a diffusion teacher."""
    out: str = ""
    """Run folder; empty = runs/<name>."""
    log_every_images: int = 51_200
    """Images between JSONL metric lines."""
    sample_every_images: int = 5_120_000
    """Images between sample grids."""
    ckpt_every_images: int = 5_120_000
    """Images between checkpoints (one is always written at the end)."""
    eval_every_images: int = 0
    """Images between FD evaluations of 1- and 2-step samples (digits only); 0 = only at the end."""
    eval_samples: int = 1797
    """Samples per FD evaluation."""
    time_limit_s: float = 0.0
    """Stop (and checkpoint) after this many seconds of training; 0 = no limit."""


@dataclass(frozen=True)
class Spec:
    name: str = "run"
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
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        sub = _SUBSPECS.get(f.name) if cls is Spec else None
        if sub is not None:
            v = _from_dict(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


_SUBSPECS: dict[str, type] = {
    "data": DataSpec,
    "net": NetSpec,
    "objective": ObjectiveSpec,
    "optim": OptimSpec,
    "train": TrainSpec,
}


def spec_from_json(text: str) -> Spec:
    return _from_dict(Spec, json.loads(text))


# ---------------------------------------------------------------------------------------------
# Loading spec files and CLI overrides


def read_spec_file(path: str | Path) -> Spec:
    """Import `specs/NAME.py` and return its `SPEC`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    mod_name = f"_scm_spec_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"not a Python spec file: {path}")
    module = importlib.util.module_from_spec(loader_spec)
    import sys

    sys.path.insert(0, str(path.parent.resolve()))  # a spec may import its sibling specs
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # a broken spec file is user input
        raise UserError(f"spec file {path} failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, Spec):
        raise UserError(f"spec file {path} must define SPEC = Spec(...)")
    return spec


_BOOL_WORDS = {"true": "True", "false": "False", "yes": "True", "no": "False", "on": "True", "off": "False"}


def apply_overrides(spec: Spec, args: list[str], prog: str = "scm_graph.train") -> Spec:
    """Apply `--field.sub value` overrides with tyro; one-line UserError on bad input.

    `--help` prints every field with its help text and exits 0.
    """
    import contextlib
    import io

    bool_flags = _bool_flags(Spec)
    args = [_BOOL_WORDS.get(a.lower(), a) if i and args[i - 1] in bool_flags else a for i, a in enumerate(args)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(
                Spec,
                default=spec,
                args=args,
                prog=prog,
                config=(tyro.conf.FlagConversionOff,),
            )
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UserError(_first_tyro_line(err.getvalue()) or f"bad arguments: {' '.join(args)}") from None


def _bool_flags(cls: type, prefix: str = "") -> set[str]:
    """`--a.b` and `--a-b` spellings of every bool field, so `--train.compile false` works."""
    import typing

    flags: set[str] = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        name, hint = f"{prefix}{f.name}", hints[f.name]
        sub = _SUBSPECS.get(f.name) if cls is Spec else None
        if sub is not None:
            flags |= _bool_flags(sub, name + ".")
        elif typing.get_origin(hint) is Annotated and typing.get_args(hint)[0] is bool or hint is bool:
            flags |= {f"--{name}", f"--{name.replace('_', '-')}"}
            for meta in getattr(hint, "__metadata__", ()):
                flags |= set(getattr(meta, "aliases", None) or ())
    return flags


def _first_tyro_line(text: str) -> str:
    """tyro draws a titled box; keep its first paragraph (wrapped lines joined) as one line."""
    parts: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("│"):
            if parts:
                break
            continue
        s = line.strip("│ ").strip()
        if not s or set(s) == {"─"}:
            if parts:
                break
            continue
        parts.append(s)
    return " ".join(parts)


def resolve(spec: Spec, manifest: Any) -> Spec:
    """Fill the shape fields of `spec.data` from a shard manifest (see scm_graph.data.Manifest)."""
    d = spec.data
    shape = tuple(manifest.shape)  # (C, H, W)
    if d.resolution and d.resolution != shape[-1]:
        raise UserError(f"spec wants resolution {d.resolution} but shards {d.name} hold {shape[-1]}")
    if d.channels and d.channels != shape[0]:
        raise UserError(f"spec wants {d.channels} channels but shards {d.name} hold {shape[0]}")
    if spec.net.class_conditional and not manifest.num_classes:
        raise UserError(f"net.class_conditional needs labelled shards; {d.name} has no labels")
    d = dataclasses.replace(
        d,
        resolution=shape[-1],
        channels=shape[0],
        num_classes=d.num_classes or manifest.num_classes,
        mean=d.mean or tuple(float(m) for m in manifest.mean),
        std=d.std or tuple(float(s) for s in manifest.std),
    )
    return dataclasses.replace(spec, data=d)


def validate(spec: Spec) -> None:
    """Cheap semantic checks with one-line messages."""
    t = spec.train
    if t.batch <= 0 or t.total_images <= 0:
        raise UserError("train.batch and train.total_images must be positive")
    _validate_net(spec)
    if not 0.0 <= spec.net.dropout < 1.0:
        raise UserError("net.dropout must be in [0, 1)")
    if spec.objective.sigma_d <= 0 or not math.isfinite(spec.objective.sigma_d):
        raise UserError("objective.sigma_d must be positive")


def _validate_net(spec: Spec) -> None:
    """Network shape checks, done by the networks' own config checks (ValueError -> one-line UserError)."""
    n, resolution = spec.net, spec.data.resolution
    if n.head_dim <= 0 or n.patch_size <= 0 or n.depth <= 0 or not n.mlp_ratio > 0:
        raise UserError("net.head_dim, net.patch_size, net.depth and net.mlp_ratio must be positive")
    try:
        if n.arch == "dit":  # resolution 0 (not resolved yet) skips the patch check
            from scm_graph.nets.dit import check_config as check_dit

            check_dit(resolution, n.channels, n.patch_size, n.head_dim)
        elif resolution:  # U-Net levels depend on the resolution: checked once the spec is resolved
            from scm_graph.nets.unet import check_config as check_unet

            check_unet(resolution, n.channels, tuple(n.channel_mult), tuple(n.attn_resolutions), n.head_dim)
    except ValueError as e:
        raise UserError(f"net.{e}") from None
