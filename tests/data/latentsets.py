"""Small latent shard sets for the tests, written directly (webdataset TarWriter + Manifest), like the
pixel writer does for PNGs: each sample holds `npy` (np.save of its posterior array), `cls` for labelled
sets and `sha256` (`manifest.sample_digest`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds

from scm_graph.data.manifest import (
    CHECKSUM,
    MANIFEST,
    LatentInfo,
    Manifest,
    sample_digest,
)

PAPER_MEAN = (1.56, -0.695, 0.483, 0.729)
PAPER_STD = (5.27, 5.91, 4.21, 4.31)
"""The per-channel SD-VAE latent statistics the ImageNet 512 specs pass (sCM / EDM2)."""


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file (np.save)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def draw_stats(arrays: np.ndarray, stored: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of the latents training draws: var = var(mean) + E[std^2] for "mean_std"."""
    a = arrays.astype(np.float64)
    c = a.shape[1] // 2 if stored == "mean_std" else a.shape[1]
    mu = a[:, :c].mean(axis=(0, 2, 3))
    var = a[:, :c].var(axis=(0, 2, 3)) + ((a[:, c:] ** 2).mean(axis=(0, 2, 3)) if stored == "mean_std" else 0.0)
    return tuple(float(v) for v in mu), tuple(float(v) for v in np.sqrt(var))


def write_latent_set(root: Path, name: str, arrays: np.ndarray, labels: np.ndarray | None = None, *,
                     num_classes: int = 0, stored: str = "mean_std", vae: str = "/no/such/vae", shard_size: int = 8,
                     members: dict[int, dict[str, bytes]] | None = None) -> Manifest:
    """`root/name`: one sample per row of `arrays` ([N, 2C or C, h, w] of float16 / float32), `shard_size`
    per shard; `members[i]` replaces sample i's members (before its checksum) to write bad samples."""
    folder = Path(root) / name
    folder.mkdir(parents=True)
    n = len(arrays)
    shards, counts = [], []
    for start in range(0, n, shard_size):
        shards.append(f"shard-{len(shards):06d}.tar")
        counts.append(min(shard_size, n - start))
        with wds.TarWriter(str(folder / shards[-1]), encoder=False, mtime=0) as w:
            for i in range(start, start + counts[-1]):
                sample: dict = {"__key__": f"{i:06d}", "npy": npy_bytes(arrays[i])}
                if labels is not None:
                    sample["cls"] = str(int(labels[i])).encode("ascii")
                if members and i in members:
                    sample = {"__key__": sample["__key__"], **members[i]}
                sample[CHECKSUM] = sample_digest(sample).encode("ascii")
                w.write(sample)
    c = arrays.shape[1] // 2 if stored == "mean_std" else arrays.shape[1]
    h, wd = arrays.shape[2:]
    mean, std = draw_stats(arrays, stored)
    m = Manifest(
        name=name, count=n, shape=(c, h, wd), dtype=str(arrays.dtype), format="npy", mean=mean, std=std,
        num_classes=num_classes, labels=num_classes > 0,
        class_names=tuple(f"class{k}" for k in range(num_classes)) if num_classes else None,
        source="test latents", shards=tuple(shards), shard_counts=tuple(counts),
        shard_bytes=tuple((folder / s).stat().st_size for s in shards), sample_checksum=CHECKSUM,
        latent=LatentInfo(vae=str(vae), scaling_factor=0.18215, stored=stored, image_resolution=8 * h),
    )
    (folder / MANIFEST).write_text(m.to_json())
    return m


def encode_latent_set(root: Path, name: str, vae_folder: Path, n: int = 48, num_classes: int = 4, seed: int = 0) -> Manifest:
    """`root/name`: n random 32x32 RGB images encoded by the VAE in `vae_folder` (float16 mean and std, labels k % classes)."""
    import torch

    from scm_graph.data.vae import encode, load_vae

    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
    posterior = encode(load_vae(vae_folder), images).numpy().astype(np.float16)
    return write_latent_set(root, name, posterior, np.arange(n) % num_classes, num_classes=num_classes,
                            vae=str(Path(vae_folder).resolve()), shard_size=16)
