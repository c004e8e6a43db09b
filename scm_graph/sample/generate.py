"""A model ready to sample, rebuilt from a checkpoint alone, and n samples from it in model units or as images.

Pixel models' samples become images through `to_uint8`; latent models' (`data.vae` set: SD-VAE latents)
are denormalised to raw latents and decoded by the VAE, which a Generator loads once (`load_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scm_graph.checkpoint import load_checkpoint
from scm_graph.data.normalize import denormalize
from scm_graph.data.vae import Vae, decode, load_vae
from scm_graph.device import pick_device
from scm_graph.errors import UserError
from scm_graph.model import TrigFlowModel, build_model, copy_params
from scm_graph.sample.samplers import (
    check_t_mid,
    consistency_times,
    ode_times,
    sample_consistency,
    sample_ode,
)
from scm_graph.spec import Spec, spec_from_json


@dataclass
class Generator:
    """A model ready to sample, rebuilt from a checkpoint alone."""

    model: TrigFlowModel
    spec: Spec
    device: torch.device
    vae: Vae | None = None
    """Latent models: the VAE that decodes samples to images (None until loaded; always None for pixel models)."""

    @property
    def sigma_d(self) -> float:
        return self.model.sigma_d

    @property
    def is_consistency(self) -> bool:
        return self.spec.objective.kind != "diffusion"

    @property
    def t_mid(self) -> float:
        """The checkpoint's t_mid of 2-step sampling (train.eval_t_mid; 1.1 for checkpoints written before it existed)."""
        return self.spec.train.eval_t_mid


def load_generator(ckpt_path: str | Path, ema: bool = True, device: str = "auto", verify: bool = True) -> Generator:
    """The checkpoint's EMA (or training) weights in a model on `device`; `verify` checks the data's checksums."""
    ckpt = load_checkpoint(ckpt_path, verify=verify)
    spec = spec_from_json(ckpt.spec_json)
    dev = pick_device(device)
    model = build_model(spec)
    weights = ckpt.ema if ema and ckpt.ema is not None else ckpt.net
    try:
        copy_params(model, weights)
    except ValueError as e:
        raise UserError(f"{ckpt_path}: {e}") from None
    return Generator(model.to(dev).eval(), spec, dev)


def check_guidance(g: Generator, guidance: float) -> None:
    """One line if `guidance` (the CFG scale s) is not a finite number >= 0, or s != 1 for a model that takes none."""
    import math

    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, not {guidance}")
    if guidance != 1.0:
        if not g.spec.net.class_conditional:
            raise UserError("--guidance needs a class-conditional model; this one is unconditional")
        if g.is_consistency and not g.model.takes_guidance:
            raise UserError("--guidance applies to diffusion models and guidance-distilled sCD students; this consistency "
                            "model takes no guidance")


def check_sampler_t_mid(g: Generator, t_mid: float | None, times: list[float] | None = None, flag: str = "--t-mid",
                        steps: list[int] | None = None) -> None:
    """One line if `t_mid` (given: not None) is not in (0, t_max), or the model, `times` or `steps` (none above 1)
    leave it nothing to set."""
    if t_mid is None:
        return
    if not g.is_consistency:
        raise UserError(f"{flag} sets consistency sampling's intermediate time; this diffusion model integrates the PF-ODE")
    if times:
        raise UserError(f"{flag} and --times exclude each other (--times gives every sampling time)")
    if steps is not None and max(steps) < 2:
        raise UserError(f"{flag} sets the time of the second step; --steps 1 has none")
    check_t_mid(t_mid, g.sigma_d, flag)


def generate(
    g: Generator,
    n: int,
    *,
    steps: int = 2,
    times: list[float] | None = None,
    solver: str = "heun",
    seed: int = 0,
    batch: int = 1024,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    sample_ids: Tensor | None = None,
    t_mid: float | None = None,
) -> Tensor:
    """n samples in model units on the CPU. Deterministic in `seed` (noise drawn on the CPU).

    Consistency models sample at `consistency_times(steps, sigma_d, t_mid)`; `t_mid` None is the checkpoint's
    (`g.t_mid`, train.eval_t_mid). `times` given overrides both.

    Class-conditional models get `labels` (default: a spread over all classes); `guidance` s != 1 follows
    the classifier-free-guided velocity (diffusion models; their training used label dropout), or is the
    CFG-scale input of a guidance-distilled sCD student. `sample_ids` (int [n]) gives every sample its own
    noise generator instead, numpy's seeded by (seed, id) (torch's CPU generator keeps only 32 bits of a
    seed): sample j then depends on (seed, sample_ids[j]) alone, not on `batch` or the other samples."""
    d = g.spec.data
    shape = (d.channels, d.resolution, d.resolution)
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"sample_ids holds {len(sample_ids)} ids for {n} samples")
    if g.spec.net.class_conditional and labels is None:
        labels = torch.arange(n) % d.num_classes
    if times:
        times = [float(t) for t in times] + ([] if g.is_consistency else [0.0])
    else:
        t_mid = g.t_mid if t_mid is None else t_mid
        times = consistency_times(steps, g.sigma_d, t_mid) if g.is_consistency else ode_times(steps, g.sigma_d)
    gen = torch.Generator().manual_seed(seed)
    k = len(times) if g.is_consistency else 1  # noise draws per sample
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        lab = None if labels is None else labels[start : start + b].to(g.device)
        if sample_ids is None:
            noise = [torch.randn(b, *shape, generator=gen) for _ in range(k)]
        else:  # one generator per sample, its k draws in order
            own = [np.random.default_rng([seed, int(i)]).standard_normal((k, *shape), dtype=np.float32)
                   for i in sample_ids[start : start + b]]
            noise = list(torch.from_numpy(np.stack(own, axis=1)))
        noise = [z.to(g.device) for z in noise]
        if g.is_consistency:
            x = sample_consistency(g.model, noise, times, lab, guidance, ict=g.spec.objective.kind == "ict")
        else:
            x = sample_ode(g.model, noise[0], times, solver, lab, guidance)
        out.append(x.float().cpu())
    return torch.cat(out)


def to_uint8(x: Tensor, spec: Spec) -> Tensor:
    """Model units -> stored uint8 units (pixel models)."""
    return denormalize(x, spec.data, spec.objective.sigma_d).round().clamp(0, 255).to(torch.uint8)


DECODE_BATCH = 8
"""Latents the VAE decodes at a time (its activations at 512 x 512 take a few GiB per batch of 8)."""


def is_latent(spec: Spec) -> bool:
    """Whether the model samples VAE latents (the resolved spec of a latent shard set names its VAE)."""
    return bool(spec.data.vae)


def decoder_folder(spec: Spec, path: str | None = None, flag: str = "--vae") -> str | None:
    """The folder of the VAE that decodes a latent model's samples (None for a pixel model): `path` (the value of
    `flag`), else the spec's `data.vae`, which must exist; one-line UserError naming `flag` otherwise. Cheap: loads nothing."""
    if not is_latent(spec):
        if path:
            raise UserError(f"{flag} given but this model samples pixels, not VAE latents")
        return None
    if not path and not Path(spec.data.vae).is_dir():
        raise UserError(f"the VAE folder {spec.data.vae} (data.vae) is missing; pass {flag} PATH, the folder of the "
                        "diffusers AutoencoderKL that encoded the shards")
    return path or spec.data.vae


def load_decoder(spec: Spec, device: torch.device | str, path: str | None = None, flag: str = "--vae") -> Vae | None:
    """The VAE that decodes a latent model's samples on `device` (None for a pixel model): the folder `path`
    (the value of `flag`), else the spec's `data.vae`; one-line UserError naming `flag` if it cannot be used."""
    name = flag if path else "data.vae"
    path = decoder_folder(spec, path, flag)
    if path is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building the module must not move the global RNG
        vae = load_vae(path, device, flag=name)
    if vae.latent_channels != spec.data.channels:
        raise UserError(f"{name} {path} decodes {vae.latent_channels}-channel latents, but this model samples "
                        f"{spec.data.channels} channels")
    return vae


def to_images(g: Generator, x: Tensor, batch: int = DECODE_BATCH) -> Tensor:
    """Model-unit samples -> uint8 images [N, C, H, W] on the CPU: pixel models through `to_uint8`; latent
    models denormalised to raw latents and decoded by `g.vae` (loaded on first use), `batch` at a time."""
    if not is_latent(g.spec):
        return to_uint8(x, g.spec)
    if g.vae is None:
        g.vae = load_decoder(g.spec, g.device)
    z = denormalize(x, g.spec.data, g.sigma_d)  # z = x / sigma_d * std + mean (inverse of the channel normalisation)
    return torch.cat([decode(g.vae, z[i : i + batch]) for i in range(0, len(z), batch)])
