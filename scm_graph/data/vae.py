"""The SD-VAE (a diffusers `AutoencoderKL` in a local folder): images -> latent posteriors and latents -> images.

Latents stay in raw VAE units throughout (what `encode(x).latent_dist` gives and `decode` takes); the
VAE's `scaling_factor` is only recorded. Images are uint8 [B, 3, H, W]; the VAE sees them in [-1, 1].
diffusers is imported only here, and only when a VAE is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from scm_graph.errors import UserError, first_line


@dataclass
class Vae:
    """A loaded AutoencoderKL (eval mode, on `device`) and what the manifest records about it."""

    module: nn.Module
    path: str
    """The folder it was loaded from (absolute)."""
    scaling_factor: float
    latent_channels: int
    factor: int
    """Spatial downsampling: image side = factor x latent side (SD-VAE: 8)."""
    device: torch.device
    dtype: torch.dtype


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             flag: str = "--vae") -> Vae:
    """The AutoencoderKL in folder `path` (saved by diffusers' `save_pretrained`, e.g. a download of
    stabilityai/sd-vae-ft-mse); one-line UserError naming `flag` if it is not one. Never downloads."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag} {path} is not a folder (pass the folder of a diffusers AutoencoderKL, e.g. a download "
                        "of stabilityai/sd-vae-ft-mse)")
    if not (p / "config.json").is_file():
        raise UserError(f"{flag} {path} is not a diffusers AutoencoderKL folder (no config.json)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("VAE latents need diffusers: pip install 'scm_graph[latents]'") from None
    try:
        import json

        kind = json.loads((p / "config.json").read_text()).get("_class_name")
        if kind != "AutoencoderKL":
            hint = "; pass its vae/ sub-folder" if (p / "vae" / "config.json").is_file() else ""
            raise ValueError(f"its config.json describes a {kind!r}, not an AutoencoderKL{hint}")
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # our one line says what went wrong, not diffusers' warnings
        try:
            vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
        finally:
            diffusers_logging.set_verbosity(level)
    except Exception as e:  # a broken folder is user input
        raise UserError(f"{flag} {path}: cannot load a diffusers AutoencoderKL ({first_line(e)})") from None
    dev = torch.device(device)
    vae = vae.to(dev).eval().requires_grad_(False)
    cfg = vae.config
    return Vae(vae, str(p.resolve()), float(getattr(cfg, "scaling_factor", 1.0) or 1.0), int(cfg.latent_channels),
               2 ** (len(cfg.block_out_channels) - 1), dev, dtype)


@torch.no_grad()
def encode(vae: Vae, images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> the posterior's [B, 2C, H/f, W/f] float32 on the CPU: mean, then std (raw units)."""
    x = images.to(vae.device, vae.dtype) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
    dist = vae.module.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float().cpu()


@torch.no_grad()
def decode(vae: Vae, latents: Tensor) -> Tensor:
    """Raw latents [B, C, h, w] -> uint8 images [B, 3, f h, f w] on the CPU."""
    y = vae.module.decode(latents.to(vae.device, vae.dtype)).sample
    return ((y.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()  # [-1, 1] -> [0, 255]
