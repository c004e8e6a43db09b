"""How a shard sample stores an image: PNG pixels, or the SD-VAE posterior as a .npy file; and the moment sums of it.

`PixelCodec` stores uint8 images as `png` members (what `scm_graph.data.writer` writes); `LatentCodec` encodes
them with a VAE (`scm_graph.data.vae`) and stores `npy` members: [2C, h, w] = mean then std ("mean_std",
EDM2's choice) or [C, h, w] = the mean ("mean"), in raw latent units, float16 or float32. Both return, per
batch, `Sums`: per-channel sums of what was stored, so the manifest's mean / std are the statistics of
what training draws (for "mean_std", z = mean + std * eps: E[z] = avg(mean), Var[z] = var(mean) + avg(std^2)).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from scm_graph.data.manifest import LatentInfo
from scm_graph.data.writer import encode_png
from scm_graph.errors import UserError

LATENT_DTYPES = ("float16", "float32")


@dataclass
class Sums:
    """Per-channel sums over the stored values: n values per channel, s = sum x, q = sum x^2, v = sum of the
    extra variance of each value (std^2 of a posterior; 0 for pixels). Integers for pixels (exact), float64
    otherwise; a job adds them up shard by shard in a fixed order, so a resumed job gets the same numbers."""

    n: int
    s: list
    q: list
    v: list

    @staticmethod
    def zeros(channels: int) -> Sums:
        """Integer zeros: they stay integers when integers are added, and become floats when floats are."""
        return Sums(0, [0] * channels, [0] * channels, [0] * channels)

    def add(self, other: Sums) -> None:
        self.n += other.n
        for mine, theirs in ((self.s, other.s), (self.q, other.q), (self.v, other.v)):
            for c, x in enumerate(theirs):
                mine[c] += x

    def to_dict(self) -> dict:
        return {"n": self.n, "s": self.s, "q": self.q, "v": self.v}

    @staticmethod
    def from_dict(d: dict, channels: int) -> Sums:
        """The inverse of `to_dict`; ValueError unless it holds `channels` numbers per sum."""
        sums = Sums(d["n"], d["s"], d["q"], d["v"])
        ok = isinstance(sums.n, int) and all(
            isinstance(x, list) and len(x) == channels and all(isinstance(v, (int, float)) for v in x)
            for x in (sums.s, sums.q, sums.v))
        if not ok:
            raise ValueError(f"not the moment sums of {channels} channels: {d}")
        return sums

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std (float64); integer sums are combined exactly, as the pixel writer does."""
        n = self.n
        mean = tuple(s / n for s in self.s)
        if all(isinstance(x, int) for x in self.s + self.q + self.v):
            var = [(q * n - s * s) / (n * n) + v / n for s, q, v in zip(self.s, self.q, self.v)]
        else:
            var = [max(q / n - (s / n) ** 2, 0.0) + v / n for s, q, v in zip(self.s, self.q, self.v)]
        return mean, tuple(math.sqrt(x) for x in var)


def _channel_sums(x: np.ndarray) -> tuple[list, list]:
    """(sum, sum of squares) per channel of [B, C, h, w]: exact integers for uint8, float64 otherwise."""
    if x.dtype == np.uint8:
        x = x.astype(np.int64)
        return [int(v) for v in x.sum((0, 2, 3))], [int(v) for v in (x * x).sum((0, 2, 3))]
    x = x.astype(np.float64)
    return [float(v) for v in x.sum((0, 2, 3))], [float(v) for v in (x * x).sum((0, 2, 3))]


class PixelCodec:
    """uint8 [3, R, R] images stored as PNG."""

    member, format, dtype = "png", "png", "uint8"
    batch = 64

    def __init__(self, resolution: int):
        self.resolution = resolution
        self.shape = (3, resolution, resolution)

    def settings(self) -> dict:
        """What fixes the bytes it writes (part of a resumable job's identity)."""
        return {"format": self.format, "resolution": self.resolution}

    def latent_info(self) -> LatentInfo | None:
        return None

    def encode(self, images: np.ndarray) -> tuple[list[bytes], Sums]:
        """uint8 [B, 3, R, R] -> (one PNG per image, their sums)."""
        s, q = _channel_sums(images)
        return [encode_png(im) for im in images], Sums(images[:, 0].size, s, q, [0] * len(s))


class LatentCodec:
    """Images encoded by a VAE; the posterior stored as .npy bytes (np.save) in raw latent units."""

    member, format = "npy", "npy"

    def __init__(self, vae, resolution: int, dtype: str = "float16", stored: str = "mean_std", batch: int = 32):
        """`vae`: a `scm_graph.data.vae.Vae`. One-line UserError if the resolution does not suit it."""
        if resolution % vae.factor:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {vae.factor}")
        if dtype not in LATENT_DTYPES:
            raise UserError(f"--dtype must be {' or '.join(LATENT_DTYPES)}, not {dtype!r}")
        self.vae, self.resolution, self.dtype, self.stored, self.batch = vae, resolution, dtype, stored, batch
        c, side = vae.latent_channels, resolution // vae.factor
        self.shape = (c, side, side)
        self.stored_shape = (2 * c if stored == "mean_std" else c, side, side)

    def settings(self) -> dict:
        return {"format": self.format, "resolution": self.resolution, "vae": self.vae.path, "dtype": self.dtype,
                "stored": self.stored}

    def latent_info(self) -> LatentInfo:
        return LatentInfo(vae=self.vae.path, scaling_factor=self.vae.scaling_factor, stored=self.stored,
                          image_resolution=self.resolution)

    def encode(self, images: np.ndarray) -> tuple[list[bytes], Sums]:
        """uint8 [B, 3, R, R] -> (one .npy per image, the sums of the rounded values that were stored)."""
        import torch

        from scm_graph.data.vae import encode

        post = encode(self.vae, torch.from_numpy(np.ascontiguousarray(images))).numpy().astype(self.dtype)
        c = self.shape[0]
        if not np.isfinite(post).all():  # a float16 overflow or a broken VAE: stop rather than store garbage
            raise UserError(f"the VAE gave non-finite latents (stored as {self.dtype}); try --dtype float32")
        mean, std = post[:, :c], post[:, c:]
        s, q = _channel_sums(mean)
        v = [float(x) for x in np.square(std.astype(np.float64)).sum((0, 2, 3))] if self.stored == "mean_std" else [0.0] * c
        stored = post if self.stored == "mean_std" else mean
        return [_npy(x) for x in stored], Sums(mean[:, 0].size, s, q, v)


def _npy(x: np.ndarray) -> bytes:
    """np.save bytes of one array (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()
