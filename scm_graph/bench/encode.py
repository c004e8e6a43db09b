"""`just bench encode`: images/s of ImageNet preprocessing and SD-VAE encoding, what `shard imagenet --vae` costs.

Generates a handful of ImageNet-sized JPEGs (500x375, 375x500, 500x333, 500x500), then times
  preprocess - decode + the ADM / EDM2 centre crop to R px (`data.imagenet.read_image`), one process,
  encode     - the VAE's posterior, cast and stored as .npy (`data.codec.LatentCodec`), in batches,
  both       - the two one after the other, as `shard imagenet --jobs 1` runs them (more --jobs hide the decoding).
The VAE is `--vae` (a diffusers AutoencoderKL folder) or, by default, a randomly initialised AutoencoderKL
with the SD-VAE's architecture (channels 128 256 512 512, 2 layers per block, 4 latent channels, 32 norm
groups): the same work, no download. The first batch (warm-up) is not timed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm_graph.bench.common import append_table, device_name, synchronize
from scm_graph.data.codec import LatentCodec
from scm_graph.data.imagenet import read_image
from scm_graph.data.vae import Vae, load_vae
from scm_graph.device import pick_device
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_file

SIZES = ((500, 375), (375, 500), (500, 333), (500, 500))
"""(width, height) of the generated JPEGs: ImageNet's common shapes."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EncodeTiming:
    batch: int
    images: int
    preprocess_ips: float
    encode_ips: float

    @property
    def both_ips(self) -> float:
        return 1.0 / (1.0 / self.preprocess_ips + 1.0 / self.encode_ips)


def sd_vae(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Vae:
    """A randomly initialised AutoencoderKL with the SD-VAE's architecture (diffusers' SD config), no download."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    module = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )
    module = module.to(device)
    if dtype != torch.float32:
        module = module.to(dtype=dtype)
    module = module.eval().requires_grad_(False)
    return Vae(module, "random SD-VAE architecture", 0.18215, 4, 8, device, dtype)


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs of ImageNet-like sizes with smooth content plus noise (what a photo costs to decode, roughly)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1)
        img = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:04d}.JPEG")
        Image.fromarray(img).save(paths[-1], format="JPEG", quality=90)
    return paths


def run(vae: Vae, resolution: int, batches: list[int], images: int, dtype: str = "float16") -> list[EncodeTiming]:
    """One row per batch size: the same `images` files preprocessed, then encoded after one warm-up batch."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), images)
        t0 = time.perf_counter()
        decoded = [read_image(p, resolution) for p in paths]
        pre = len(paths) / (time.perf_counter() - t0)
    if any(isinstance(x, str) for x in decoded):
        raise UserError(f"could not decode a generated image: {next(x for x in decoded if isinstance(x, str))}")
    stack = np.stack(decoded)
    for batch in batches:
        codec = LatentCodec(vae, resolution, dtype, "mean_std", batch)
        codec.encode(stack[:batch])  # warm-up: allocator, kernel choice
        synchronize(vae.device)
        t0 = time.perf_counter()
        for i in range(0, len(stack), batch):
            codec.encode(stack[i : i + batch])  # returns CPU bytes: the device has finished
        rows.append(EncodeTiming(batch, len(stack), pre, len(stack) / (time.perf_counter() - t0)))
    return rows


def to_markdown(rows: list[EncodeTiming], device: str, vae: str, resolution: int, dtype: str) -> str:
    lines = [
        f"# ImageNet {resolution} preprocessing + VAE encoding: {device}",
        "",
        (f"torch {torch.__version__}, VAE: {vae}, computed in {dtype}, latents stored as float16 mean_std. "
         "preprocess = decode + ADM / EDM2 centre crop of ImageNet-sized JPEGs (one process); encode = the VAE "
         "posterior, cast and saved as .npy (after one warm-up batch); both = one after the other (`--jobs 1`)."),
        "",
        "| batch | images | preprocess img/s | encode img/s | both img/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.batch} | {r.images} | {r.preprocess_ips:.1f} | {r.encode_ips:.2f} | {r.both_ips:.2f} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="scm_graph.bench encode", description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="", help="a diffusers AutoencoderKL folder (default: a random SD-VAE architecture)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="images per encoder call (default: 32 on CUDA, 2 on CPU)")
    p.add_argument("--images", type=int, default=None, help="images timed per batch size (default: 256 on CUDA, 6 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the VAE's compute dtype (default: fp32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="also append the markdown table to this file (e.g. docs/bench_encode_h100.md)")
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    batches = a.batch or ([32] if dev.type == "cuda" else [2])
    images = a.images or (256 if dev.type == "cuda" else 6)
    if a.resolution <= 0 or images <= 0 or any(b <= 0 for b in batches):
        raise UserError("--resolution, --images and --batch must be positive")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    vae = load_vae(a.vae, dev, DTYPES[a.dtype]) if a.vae else sd_vae(dev, DTYPES[a.dtype])
    rows = run(vae, a.resolution, batches, images)
    md = to_markdown(rows, device_name(dev), vae.path, a.resolution, a.dtype)
    print(md)
    if a.out:
        append_table(a.out, md)
