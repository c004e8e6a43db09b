"""The batch stream: deterministic, resumable batches from a shard set written by `python -m scm_graph.shard`.

The batch stream is infinite and a pure function of (seed, rank): per rank, the sample stream is cut
into segments of `spec.segment_images` samples; segment s is a webdataset pipeline (resampled shards ->
tar samples -> shuffle buffer) seeded from (seed, rank, s). Resuming at image k rebuilds segment
k // segment_images and drops the first k % segment_images raw samples before any decoding. With
`spec.workers > 0` every worker runs the same raw pipeline (cheap when the shards' indexes are cached,
`scm_graph.data.tarindex`: sets up to its CACHE_SAMPLES) and decodes only the chunks c of CHUNK samples with c % workers == worker_id,
handing each over whole; the DataLoader's in-order round robin restores the exact order, so the stream does
not depend on the worker count either. A corrupt shard or sample is reported when its shard is indexed or its
chunk decoded, so the good samples just before it may not come out first.

Pixel sets ("png") give uint8 images. Latent sets ("npy", SD-VAE posteriors in raw units) give float32
latents: with `latent.stored` "mean_std" and `spec.posterior`, each is a draw z = mean + std * eps
(EDM2), eps from a generator seeded by (seed, rank, index of the batch's first image in this rank's
stream), so a resumed stream draws the same eps as an unbroken one; otherwise the mean. Both are then
normalised (`scm_graph.data.normalize`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from scm_graph.data import tarindex
from scm_graph.data.manifest import CHECKSUM, Manifest, sample_digest, shard_hint
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
    """Load the manifest of `<spec.root>/<spec.name>`, check every shard file is there (and whole) and that
    the first sample matches the manifest (so a mismatch fails before training starts)."""
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
    _check_first_sample(str(folder / m.shards[0]), m)
    return m


def _check_first_sample(url: str, m: Manifest) -> None:
    """Decode the first sample of shard `url` and check it against the manifest."""
    samples = _read_shards([{"url": url}], {})
    try:
        first = next(samples, None)
    finally:
        samples.close()
    if first is None:
        raise UserError(f"shard file {url} holds no samples; {shard_hint(Path(url).parent, rewrite=True)}")
    _decode(first, m)


def read_all(spec: DataSpec) -> Iterator[tuple[bytes, int]]:
    """Every sample of a pixel set once, in shard and file order, checked and decoded as (uint8 CHW bytes, label or -1)."""
    m = open_shards(spec)
    if m.latent is not None:
        raise UserError(f"shard set {Path(spec.root) / spec.name} holds VAE latents; only pixel sets can be read as images")
    folder = Path(spec.root) / spec.name
    paths = [str(folder / s) for s in m.shards]
    return _read_all(paths, m)


def _read_all(paths: list[str], m: Manifest) -> Iterator[tuple[bytes, int]]:
    """The samples of `paths` (checked against the manifest's counts), decoded."""
    n = 0
    for sample in _read_shards([{"url": p} for p in paths], dict(zip(paths, m.shard_counts))):
        n += 1
        yield _decode(sample, m)
    if n != m.count:
        raise UserError(f"shard set {Path(paths[0]).parent} holds {n} samples, manifest says {m.count}")


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


def _plain(e: BaseException) -> str:
    """An exception's reason in one line, without the stream reprs that tarfile, webdataset and PIL add."""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    else:
        msg = str(e.args[0]) if e.args else ""
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", msg.split(" @ ")[0])
    lines = msg.strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _corrupt(url: str, e: BaseException) -> UserError:
    return UserError(f"shard file {url} is truncated or corrupt ({_plain(e)})")


def _index_shards(urls: list[str]) -> None:
    """Index the shards in this process now (DataLoader workers forked later inherit the indexes)."""
    for url in urls:
        try:
            tarindex.warm(url)
        except Exception as e:  # as in _read_shards
            raise _corrupt(url, e) from None


def _read_shards(srcs: Iterable[dict], expected: dict[str, int]) -> Iterator[dict]:
    """Raw samples (dicts of bytes) of each shard, through its index (`scm_graph.data.tarindex`); corrupt or
    truncated shards -> UserError."""
    for src in srcs:
        url, n = src["url"], 0
        try:
            for sample in tarindex.read(url):
                n += 1
                yield sample
        except Exception as e:  # any tarfile/wds failure means a bad shard; keep one line
            raise _corrupt(url, e) from None
        if url in expected and n != expected[url]:
            got = f"{n} sample{'s' if n != 1 else ''}"
            raise UserError(f"shard file {url} is truncated or corrupt ({got}, manifest says {expected[url]})")


def _take(src: Iterable[Any], start: int, stop: int) -> Iterator[Any]:
    """Samples start..stop-1 of the stream (the skip happens on raw, undecoded samples)."""
    return islice(src, start, stop)


CHUNK = 64
"""Samples a worker decodes in a row and hands over at once (one pickle and one queue trip per chunk, not per image)."""


def _worker_chunks(src: Iterable[Any]) -> Iterator[list[Any]]:
    """Cut the raw stream into chunks of CHUNK samples and keep chunk c when c % num_workers == worker id
    (every chunk outside a DataLoader). The DataLoader's in-order round robin over the workers then hands the
    chunks back in stream order."""
    info = get_worker_info()
    workers, me = (1, 0) if info is None else (info.num_workers, info.id)
    chunk: list[Any] = []
    for j, sample in enumerate(src):
        if (j // CHUNK) % workers == me:
            chunk.append(sample)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _decode_chunk(chunk: list[dict], m: Manifest) -> list[tuple[bytes, int]]:
    return [_decode(sample, m) for sample in chunk]


def _catch_user_errors(src: Iterable[Any]) -> Iterator[Any]:
    """Turn a UserError into a message item, so it crosses DataLoader workers as one line."""
    try:
        yield from src
    except UserError as e:
        yield str(e)


def _where(sample: dict) -> str:
    """'shard file F: sample K' (the key escaped, so a foreign name cannot break the line)."""
    return f"shard file {sample.get('__url__')}: sample {repr(str(sample.get('__key__')))[1:-1]}"


def _verify(sample: dict, m: Manifest) -> None:
    """The sample's `sha256` member matches its other members (sets written with a checksum)."""
    if m.sample_checksum is None:
        return
    where, stored = _where(sample), sample.get(CHECKSUM)
    if stored is None:
        raise UserError(f"{where} has no {CHECKSUM} member, but the manifest says every sample has one")
    if bytes(stored) != sample_digest(sample).encode("ascii"):
        raise UserError(f"{where} does not match its {CHECKSUM} checksum (corrupt data)")


def _image(sample: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """The sample's PNG as uint8 [H, W] or [H, W, 3]; its mode must match the channels, its size the manifest."""
    where = _where(sample)
    c, h, w = shape
    want = "L" if c == 1 else "RGB"
    if "png" not in sample:
        raise UserError(f"{where} has no png member")
    try:
        with Image.open(io.BytesIO(sample["png"]), formats=["PNG"]) as img:
            if img.mode != want:
                raise UserError(f"{where} is a png of mode {img.mode}, "
                                f"but the manifest says {c} channel{'s' if c > 1 else ''} (mode {want})")
            if img.size != (w, h):
                raise UserError(f"{where} is {img.size[0]}x{img.size[1]}, manifest says {w}x{h}")
            return np.asarray(img)
    except UserError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f"{where} has a bad png (not a PNG image)") from None
    except Exception as e:  # any decoder failure means bad bytes
        raise UserError(f"{where} has a bad png ({_plain(e)})") from None


def _label(sample: dict, num_classes: int) -> int:
    """The sample's `cls` as an int in 0..num_classes-1, or -1 for an unlabelled set (which must have no `cls`)."""
    where, cls = _where(sample), sample.get("cls")
    if not num_classes:
        if cls is not None:
            raise UserError(f"{where} has a label (cls member), but the manifest says the set is unlabelled")
        return -1
    if cls is None:
        raise UserError(f"{where} has no label (cls member), but the manifest says the set is labelled")
    text = bytes(cls).decode("ascii", "replace")
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) < num_classes):
        raise UserError(f"{where} has label {text[:20]!r}, expected an integer in 0..{num_classes - 1}")
    return int(text)


def _stored_shape(m: Manifest) -> tuple[int, int, int]:
    """The shape of a latent sample's array: [2C, h, w] (mean then std) for "mean_std", [C, h, w] for "mean"."""
    c, h, w = m.shape
    return (2 * c if m.latent is not None and m.latent.stored == "mean_std" else c, h, w)


def _latent(sample: dict, m: Manifest) -> np.ndarray:
    """The sample's `npy` member as an array of the manifest's dtype and stored shape (np.load, no pickles)."""
    where = _where(sample)
    if "npy" not in sample:
        raise UserError(f"{where} has no npy member")
    try:
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    except Exception as e:  # any parser failure means bad bytes
        raise UserError(f"{where} has a bad npy ({_plain(e)})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive loads as an NpzFile
        raise UserError(f"{where} has a bad npy (an .npz archive, not one array)")
    if arr.dtype != np.dtype(m.dtype):
        raise UserError(f"{where} is a {arr.dtype} array, but the manifest says {m.dtype}")
    want = _stored_shape(m)
    if arr.shape != want:
        what = "mean then std" if m.latent is not None and m.latent.stored == "mean_std" else "the mean"
        raise UserError(f"{where} has shape {list(arr.shape)}, but the manifest says {list(want)} ({what})")
    if not np.isfinite(arr).all():
        raise UserError(f"{where} holds non-finite values")
    return arr


def _decode(sample: dict, m: Manifest) -> tuple[bytes, int]:
    """Raw sample -> (array bytes, label or -1): checksum, then PNG (PIL only) as uint8 CHW or npy as the
    manifest's dtype in its stored shape, then label."""
    _verify(sample, m)
    if m.format == "npy":
        arr = _latent(sample, m)
        return np.ascontiguousarray(arr).tobytes(), _label(sample, m.num_classes)
    c, h, w = m.shape
    arr = _image(sample, m.shape)
    label = _label(sample, m.num_classes)
    return np.ascontiguousarray(arr.reshape(h, w, c).transpose(2, 0, 1)).tobytes(), label


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
        _worker_chunks,
        wds.map(functools.partial(_decode_chunk, m=m)),
        _catch_user_errors,
    )


def _run_segment(pipeline: wds.DataPipeline, workers: int) -> Iterator[tuple[bytes, int]]:
    """A segment's decoded samples (its pipeline stops after `segment_images`), in order, in-process or through a
    DataLoader."""
    if workers > 0:
        source: Iterable[Any] = DataLoader(pipeline, batch_size=None, num_workers=workers)
    else:
        source = pipeline
    for chunk in source:
        if isinstance(chunk, str):
            raise UserError(chunk)
        for x, label in chunk:
            yield x, int(label)


def _sample_stream(spec: DataSpec, m: Manifest, seed: int, rank: int, start: int) -> Iterator[tuple[bytes, int]]:
    """Infinite decoded sample stream of one rank from sample `start` on."""
    if spec.workers > 0 and m.count <= tarindex.CACHE_SAMPLES:  # workers fork from this process: index here, once
        _index_shards([str(Path(spec.root) / spec.name / s) for s in m.shards])
    segment, skip = divmod(start, spec.segment_images)
    while True:
        pipeline = _segment_pipeline(spec, m, seed, rank, segment, skip)
        yield from _run_segment(pipeline, spec.workers)
        segment, skip = segment + 1, 0


def _check_stream_args(spec: DataSpec, batch: int, start_images: int, rank: int, world_size: int) -> None:
    """One-line errors for impossible stream settings."""
    if batch <= 0:
        raise UserError(f"batch must be positive, not {batch}")
    if start_images < 0:
        raise UserError(f"start_images must be >= 0, not {start_images}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    if spec.segment_images <= 0:
        raise UserError(f"data.segment_images must be positive, not {spec.segment_images}")
    if spec.shuffle_buffer < 0:
        raise UserError(f"data.shuffle_buffer must be >= 0, not {spec.shuffle_buffer}")
    if spec.workers < 0:
        raise UserError(f"data.workers must be >= 0, not {spec.workers}")


def posterior_seed(seed: int, rank: int, first: int) -> int:
    """The seed of the eps of the batch whose first image is image `first` of rank `rank`'s stream."""
    return _derive_seed(int(seed), int(rank), int(first), "posterior")


def latents(data: bytes, m: Manifest, batch: int, posterior: bool, seed: int) -> torch.Tensor:
    """A batch of stored latent arrays -> float32 raw latents [B, C, h, w]: a posterior draw per sample
    (stored "mean_std" and `posterior`), eps ~ N(0, I) from a generator seeded with `seed`; else the mean."""
    c, h, w = m.shape
    arr = torch.from_numpy(np.frombuffer(data, dtype=m.dtype).reshape(batch, *_stored_shape(m)).astype(np.float32))
    mean = arr[:, :c]
    if not (posterior and m.latent is not None and m.latent.stored == "mean_std"):
        return mean.contiguous()
    eps = torch.randn((batch, c, h, w), generator=torch.Generator().manual_seed(seed))
    return mean + arr[:, c:] * eps  # z = mean + std * eps (EDM2, Karras et al. 2024: a sample of the VAE posterior)


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
    if m.latent is not None and spec.normalize != "channel":
        raise UserError(f"shards {spec.name} hold VAE latents: set data.normalize to 'channel' (per-channel mean / std)")
    c, h, w = m.shape
    samples = _sample_stream(spec, m, seed, rank, start_images)
    first = start_images  # index of the next batch's first image in this rank's stream
    while True:
        chunk = list(islice(samples, batch))
        data = b"".join(x for x, _ in chunk)
        if m.latent is None:
            x = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(batch, c, h, w).copy())
        else:
            x = latents(data, m, batch, spec.posterior, posterior_seed(seed, rank, first))
        x0 = normalize(x, spec, sigma_d)
        label = torch.tensor([lab for _, lab in chunk], dtype=torch.int64) if m.labels else None
        yield Batch(x0=x0, label=label)
        first += batch
