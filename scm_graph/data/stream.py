"""The batch stream: deterministic, resumable batches from a shard set written by `python -m scm_graph.shard`.

The batch stream is infinite and a pure function of (seed, rank): per rank, the sample stream is cut
into segments of `spec.segment_images` samples; segment s is a webdataset pipeline (resampled shards ->
tar samples -> shuffle buffer) seeded from (seed, rank, s). Resuming at image k rebuilds segment
k // segment_images and drops the first k % segment_images raw samples before any decoding. With
`spec.workers > 0` every worker runs the same raw pipeline and decodes only the samples j with
j % workers == worker_id; the DataLoader's in-order round robin restores the exact order, so the
stream does not depend on the worker count either.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from scm_graph.data.manifest import Manifest, shard_hint
from scm_graph.data.normalize import normalize
from scm_graph.errors import UserError
from scm_graph.spec import DataSpec


@dataclass
class Batch:
    x0: torch.Tensor
    """[B, C, H, W] float32, normalised (model units)."""
    label: torch.Tensor | None
    """[B] int64, None when the shard set is unlabelled."""


def open_shards(spec: DataSpec) -> Manifest:
    """Load the manifest of `<spec.root>/<spec.name>` and check every shard file is there (and whole)."""
    folder = Path(spec.root) / spec.name
    m = Manifest.load(folder)
    for i, s in enumerate(m.shards):
        p = folder / s
        if not p.is_file():
            raise UserError(f"shard file {p} is missing; {shard_hint(folder, rewrite=True)}")
        size = p.stat().st_size
        if m.shard_bytes and size != m.shard_bytes[i]:
            problem = f"{size} bytes, manifest says {m.shard_bytes[i]}"
        elif not _has_tar_end(p, size):
            problem = "no end-of-archive marker"
        else:
            continue
        raise UserError(f"shard file {p} is truncated or corrupt ({problem}); {shard_hint(folder, rewrite=True)}")
    return m


def _has_tar_end(path: Path, size: int) -> bool:
    """Whether a tar file ends in whole blocks with the two zero blocks of an end-of-archive marker."""
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not f.read(1024).strip(b"\0")


# ---------------------------------------------------------------------------------------------
# Raw sample stream (webdataset stages)


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _resampled_shards(paths: tuple[str, ...], weights: tuple[int, ...], seed: int) -> Iterator[dict]:
    """Infinite stream of {"url": shard}, drawn with replacement, weighted by samples per shard."""
    rng = random.Random(seed)
    while True:
        yield {"url": rng.choices(paths, weights=weights)[0]}


def _read_shards(srcs: Iterable[dict], expected: dict[str, int]) -> Iterator[dict]:
    """Raw samples (dicts of bytes) of each shard; corrupt or truncated shards -> UserError."""
    for src in srcs:
        url, n = src["url"], 0
        try:
            with open(url, "rb") as f:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": f}])):
                    n += 1
                    yield sample
        except Exception as e:  # tarfile/wds errors carry the stream in their args; keep one line
            msg = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
            raise UserError(f"shard file {url} is truncated or corrupt ({msg.splitlines()[0]})") from None
        if url in expected and n != expected[url]:
            raise UserError(f"shard file {url} is truncated or corrupt ({n} samples, manifest says {expected[url]})")


def _take(src: Iterable[Any], start: int, stop: int) -> Iterator[Any]:
    """Samples start..stop-1 of the stream (the skip happens on raw, undecoded samples)."""
    return islice(src, start, stop)


def _worker_split(src: Iterable[Any]) -> Iterator[Any]:
    """Keep the samples j with j % num_workers == worker id (everything outside a DataLoader)."""
    info = get_worker_info()
    if info is None:
        yield from src
        return
    for j, sample in enumerate(src):
        if j % info.num_workers == info.id:
            yield sample


def _decode(sample: dict, shape: tuple[int, int, int], num_classes: int) -> tuple[bytes, int]:
    """Raw sample -> (uint8 CHW image bytes, label or -1); decodes PNG with PIL only."""
    url, key = sample.get("__url__"), sample.get("__key__")
    c, h, w = shape
    try:
        with Image.open(io.BytesIO(sample["png"]), formats=["PNG"]) as img:
            mode = "L" if c == 1 else "RGB"
            arr = np.asarray(img.convert(mode) if img.mode != mode else img)
    except (KeyError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"shard file {url}: sample {key} has a bad png ({type(e).__name__}: {e})") from None
    if arr.shape[:2] != (h, w):
        raise UserError(f"shard file {url}: sample {key} is {arr.shape[1]}x{arr.shape[0]}, manifest says {w}x{h}")
    image = np.ascontiguousarray(arr.reshape(h, w, c).transpose(2, 0, 1)).tobytes()
    if not num_classes:
        return image, -1
    try:
        label = int(sample["cls"].decode("ascii"))
    except (KeyError, ValueError, UnicodeDecodeError):
        label = -1
    if not 0 <= label < num_classes:
        raise UserError(f"shard file {url}: sample {key} has a missing or bad label")
    return image, label


def _catch_user_errors(src: Iterable[Any]) -> Iterator[Any]:
    """Turn a UserError into a message item, so it crosses DataLoader workers as one line."""
    try:
        yield from src
    except UserError as e:
        yield str(e)


def _segment_pipeline(spec: DataSpec, m: Manifest, seed: int, rank: int, segment: int, skip: int) -> wds.DataPipeline:
    """Segment `segment` of rank `rank`'s stream, without its first `skip` samples."""
    folder = Path(spec.root) / spec.name
    paths = tuple(str(folder / s) for s in m.shards)
    weights = m.shard_counts or tuple(1 for _ in paths)
    expected = dict(zip(paths, m.shard_counts))
    base = (int(seed), int(rank), int(segment))
    buf = spec.shuffle_buffer
    return wds.DataPipeline(
        functools.partial(_resampled_shards, paths, weights, _derive_seed(*base, "shards")),
        functools.partial(_read_shards, expected=expected),
        wds.shuffle(buf, initial=buf, seed=_derive_seed(*base, "shuffle")) if buf > 1 else None,
        functools.partial(_take, start=skip, stop=spec.segment_images),
        _worker_split,
        wds.map(functools.partial(_decode, shape=m.shape, num_classes=m.num_classes)),
        _catch_user_errors,
    )


def _run_segment(pipeline: wds.DataPipeline, workers: int, n: int) -> Iterator[tuple[bytes, int]]:
    """The first n decoded samples of a segment, in order, in-process or through a DataLoader."""
    if workers > 0:
        source: Iterable[Any] = DataLoader(pipeline, batch_size=None, num_workers=workers)
    else:
        source = pipeline
    for item in islice(iter(source), n):
        if isinstance(item, str):
            raise UserError(item)
        yield item[0], int(item[1])


def _sample_stream(spec: DataSpec, m: Manifest, seed: int, rank: int, start: int) -> Iterator[tuple[bytes, int]]:
    """Infinite decoded sample stream of one rank from sample `start` on."""
    segment, skip = divmod(start, spec.segment_images)
    while True:
        pipeline = _segment_pipeline(spec, m, seed, rank, segment, skip)
        yield from _run_segment(pipeline, spec.workers, spec.segment_images - skip)
        segment, skip = segment + 1, 0


def _check_stream_args(spec: DataSpec, batch: int, start_images: int, rank: int, world_size: int) -> None:
    """One-line errors for impossible stream settings."""
    if batch <= 0 or start_images < 0:
        raise UserError(f"batch must be positive and start_images >= 0 (got {batch}, {start_images})")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    if spec.segment_images <= 0 or spec.shuffle_buffer < 0 or spec.workers < 0:
        raise UserError("data.segment_images must be positive, data.shuffle_buffer and data.workers >= 0")


def batches(
    spec: DataSpec,
    sigma_d: float,
    batch: int,
    seed: int,
    start_images: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Infinite deterministic batches for `rank`; `start_images=k` resumes exactly at image k."""
    _check_stream_args(spec, batch, start_images, rank, world_size)
    m = open_shards(spec)
    c, h, w = m.shape
    samples = _sample_stream(spec, m, seed, rank, start_images)
    while True:
        chunk = list(islice(samples, batch))
        pixels = np.frombuffer(b"".join(img for img, _ in chunk), dtype=np.uint8).reshape(batch, c, h, w)
        x0 = normalize(torch.from_numpy(pixels.copy()), spec, sigma_d)
        label = torch.tensor([lab for _, lab in chunk], dtype=torch.int64) if m.labels else None
        yield Batch(x0=x0, label=label)
