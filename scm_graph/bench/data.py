"""`python -m scm_graph.bench data [--spec specs/digits_sct.py] [--workers 0 1 2]` (or `just bench data`): does the
data path keep up with training?

Images/s of the stream the trainer reads (`scm_graph.data.stream.batches`: shard samples checked, decoded,
batched and normalised, at the spec's batch) with each asked DataLoader worker count (`data.workers`), against
the images/s the trainer consumes (`--train-ips`); the digits run wants the stream at >= 10x its consumer.
Then ImageNet-64 at the paper's batch on 8 GPUs: the decoded images/s such an sCT run needs per process and
per node and, with `--imagenet-probe N` (default 2048, 0 skips it), the same stream measured on N synthetic
64x64 RGB PNGs written by the project's shard writer, with the decode workers per GPU it would take.

Timing: the first batch of each stream is not timed (it opens the shards, fills the shuffle buffer and starts
the workers); then --rounds rounds of --batches batches from the same stream; the best round counts (the
median is shown beside it). Prints a markdown table per part and (with --out) appends them to a file.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scm_graph.bench.common import append_table
from scm_graph.bench.data_needs import (
    ASSUMED_GPU_IPS,
    DEFAULT_IMAGENET_STEP_S,
    DIGITS_TRAIN_IPS,
    IMAGENET_BATCH,
    IMAGENET_GPUS,
    PROBE_CLASSES,
    PROBE_NAME,
    PROBE_NOISE,
    PROBE_RESOLUTION,
    PROBE_SHARD_SIZE,
    TARGET,
    ImagenetNeed,
    ImagenetProbe,
    ReadCosts,
    StreamTiming,
    assumed_step_s,
)
from scm_graph.bench.data_report import load_average, report
from scm_graph.data import tarindex
from scm_graph.data.manifest import Manifest, resolve_spec
from scm_graph.data.stream import _decode, _read_shards, batches, open_shards
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_file
from scm_graph.spec import DataSpec, Spec
from scm_graph.specfile import read_spec_file


def _check_counts(workers: Sequence[int], batch: int, n_batches: int, rounds: int) -> None:
    for w in workers:
        if w < 0:
            raise UserError(f"--workers must be >= 0, not {w}")
    if not workers:
        raise UserError("--workers needs at least one worker count")
    for flag, v in (("--batch", batch), ("--batches", n_batches), ("--rounds", rounds)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, not {v}")


def resolved(spec: Spec) -> Spec:
    """The spec with its data shape and statistics from its shard set's manifest (a missing or broken set is a
    one-line UserError saying how to write it)."""
    return resolve_spec(spec, open_shards(spec.data))


def time_stream(spec: Spec, workers: int, batch: int, n_batches: int, rounds: int, consumption_ips: float,
                target: float = TARGET) -> StreamTiming:
    """The spec's stream with `workers` DataLoader workers: one untimed batch, then `rounds` rounds of `n_batches`."""
    _check_counts([workers], batch, n_batches, rounds)
    data = dataclasses.replace(spec.data, workers=workers)
    stream = batches(data, spec.objective.sigma_d, batch, spec.train.seed)
    try:
        t0 = time.perf_counter()
        next(stream)
        first = time.perf_counter() - t0
        rates = []
        for _ in range(rounds):
            t1 = time.perf_counter()
            for _ in range(n_batches):
                next(stream)
            rates.append(batch * n_batches / (time.perf_counter() - t1))
    finally:
        stream.close()  # ends the DataLoader's workers
    return StreamTiming(workers, batch, batch * n_batches, max(rates), statistics.median(rates), first,
                        consumption_ips, target)


def bench_stream(spec: Spec, workers: Sequence[int], batch: int, n_batches: int, rounds: int, consumption_ips: float,
                 target: float = TARGET, say: bool = False) -> list[StreamTiming]:
    """One row per worker count (duplicates dropped), in the given order."""
    _check_counts(workers, batch, n_batches, rounds)
    if not consumption_ips > 0:
        raise UserError(f"--train-ips must be positive, not {consumption_ips}")
    spec = resolved(spec)
    rows = []
    for w in dict.fromkeys(workers):
        rows.append(time_stream(spec, w, batch, n_batches, rounds, consumption_ips, target))
        if say:
            r = rows[-1]
            print(f"  {spec.data.name}: {w} worker{'s' if w != 1 else ''}  {r.images_per_s:9.1f} img/s  "
                  f"{r.ratio:6.2f}x  (first batch {r.first_batch_s:.2f} s)", flush=True)
    return rows


def probe_images(n: int, resolution: int = PROBE_RESOLUTION, seed: int = 0) -> np.ndarray:
    """n uint8 [3, R, R] images: smooth random colour fields (bicubic from 4x4) plus N(0, PROBE_NOISE) noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, resolution, resolution), dtype=np.uint8)
    for i in range(n):
        low = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
        up = np.stack([np.asarray(Image.fromarray(c).resize((resolution, resolution), Image.Resampling.BICUBIC))
                       for c in low]).astype(np.float32)
        out[i] = np.clip(up + rng.normal(0, PROBE_NOISE, size=up.shape), 0, 255).astype(np.uint8)
    return out


def write_probe(root: Path, n: int, resolution: int = PROBE_RESOLUTION, seed: int = 0) -> Manifest:
    """Write `<root>/imagenet64-probe/`: n synthetic labelled RGB PNGs, as `shard imagenet` / `shard folder` store
    them (the project's writer: png, cls and sha256 members)."""
    from scm_graph.data.source import array_source
    from scm_graph.data.writer import write_set

    if n < 1:
        raise UserError(f"--imagenet-probe must be at least 1 image to write a probe, not {n}")
    labels = np.random.default_rng(seed + 1).integers(0, PROBE_CLASSES, size=n)
    names = tuple(f"class{k:03d}" for k in range(PROBE_CLASSES))
    source = array_source(PROBE_NAME, f"{n} synthetic {resolution}x{resolution} RGB images (bench data)",
                          probe_images(n, resolution, seed), labels, names)
    return write_set(source, out=root, shard_size=PROBE_SHARD_SIZE, progress=False)


def probe_spec(root: Path) -> Spec:
    """The ImageNet-64 specs' data settings (pixel normalisation, the default shuffle buffer) over the probe set."""
    return Spec(data=DataSpec(name=PROBE_NAME, root=str(root), normalize="pixel"))


def read_costs(spec: Spec) -> ReadCosts:
    """Read the set's shards twice (raw samples: a first pass that parses the tar headers with the shard index
    cache emptied, then a pass as a stream's later ones make), then decode every sample, in this process (what a
    stream does per sample, without the shuffle, the batching and the normalisation)."""
    m = open_shards(spec.data)
    folder = Path(spec.data.root) / spec.data.name
    srcs = [{"url": str(folder / s)} for s in m.shards]
    tarindex.forget()
    t0 = time.perf_counter()
    sum(1 for _ in _read_shards(srcs, {}))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = list(_read_shards(srcs, {}))  # a stream's later passes
    raw_s = time.perf_counter() - t0
    cached = m.count <= tarindex.CACHE_SAMPLES
    t0 = time.perf_counter()
    for sample in raw:
        _decode(sample, m)
    decode_s = time.perf_counter() - t0
    size = sum(len(s[m.format]) for s in raw) / len(raw)  # the member is named after the format: png or npy
    return ReadCosts(len(raw), size, len(raw) / raw_s, len(raw) / decode_s, len(raw) / first_s if cached else None)


def bench_imagenet_probe(n: int, need: ImagenetNeed, workers: Sequence[int], n_batches: int, rounds: int,
                         say: bool = False) -> ImagenetProbe:
    """Write n synthetic 64x64 images in a temp folder, then time their stream per worker count at the per-process
    batch against the per-process need (target 1x: keeping up), and the one-process read and decode rates. The
    shard index cache is off throughout: ImageNet's 1.28 M samples exceed it, so a real run parses most shards'
    headers on every pass, which a probe this small would otherwise hide."""
    kept = tarindex.CACHE_SAMPLES
    tarindex.CACHE_SAMPLES = 0  # forked DataLoader workers inherit it
    try:
        return _imagenet_probe(n, need, workers, n_batches, rounds, say)
    finally:
        tarindex.CACHE_SAMPLES = kept


def _imagenet_probe(n: int, need: ImagenetNeed, workers: Sequence[int], n_batches: int, rounds: int,
                    say: bool) -> ImagenetProbe:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        t0 = time.perf_counter()
        m = write_probe(Path(tmp), n)
        if say:
            print(f"  wrote {n} synthetic {PROBE_RESOLUTION}x{PROBE_RESOLUTION} PNGs in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        spec = probe_spec(Path(tmp))
        costs = read_costs(spec)
        rows = bench_stream(spec, workers, need.per_process_batch, n_batches, rounds, need.per_process_ips, 1.0, say)
    return ImagenetProbe(costs, rows, len(m.shards))



@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.bench data",
                       description="Images/s of the shard stream per DataLoader worker count, against the trainer's consumption.")
    p.add_argument("--spec", default="specs/digits_sct.py", help="spec whose data section and batch to use")
    p.add_argument("--root", default="", help="folder holding the shard sets (default: the spec's data.root)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts (default: 0 1 2)")
    p.add_argument("--batch", type=int, default=0, help="images per batch (default: the spec's train.batch)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per round (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest counts (default: 3)")
    p.add_argument("--train-ips", type=float, default=None,
                   help=f"images/s the trainer consumes (default for the digits set: {DIGITS_TRAIN_IPS}, the compiled "
                   "diffusion step of docs/bench_step_cpu.md)")
    p.add_argument("--imagenet-probe", type=int, default=2048,
                   help="synthetic 64x64 PNGs to write and stream for the ImageNet-64 estimate (default: 2048; 0 skips)")
    p.add_argument("--imagenet-step-s", type=float, default=None,
                   help=f"seconds per ImageNet-64 sCT step (default: about {ASSUMED_GPU_IPS:.0f} img/s per H100, an "
                   f"assumption stated in the report: {DEFAULT_IMAGENET_STEP_S} s at batch {IMAGENET_BATCH} on "
                   f"{IMAGENET_GPUS} GPUs)")
    p.add_argument("--imagenet-batch", type=int, default=IMAGENET_BATCH, help=f"global batch (default: {IMAGENET_BATCH})")
    p.add_argument("--imagenet-gpus", type=int, default=IMAGENET_GPUS, help=f"GPUs, one process each (default: {IMAGENET_GPUS})")
    p.add_argument("--note", default="", help="a sentence about the machine's state to put in the report")
    p.add_argument("--out", default="", help="also append the report to this file (e.g. docs/bench_data_cpu.md)")
    a = p.parse_args(argv)
    _check_counts(a.workers, a.batch or 1, a.batches, a.rounds)
    if a.train_ips is not None and not a.train_ips > 0:
        raise UserError(f"--train-ips must be positive, not {a.train_ips}")
    if a.imagenet_probe < 0:
        raise UserError(f"--imagenet-probe must be >= 0, not {a.imagenet_probe}")
    if a.imagenet_step_s is not None and not a.imagenet_step_s > 0:
        raise UserError(f"--imagenet-step-s must be positive, not {a.imagenet_step_s}")
    if a.imagenet_gpus < 1 or a.imagenet_batch < a.imagenet_gpus or a.imagenet_batch % a.imagenet_gpus:
        raise UserError(f"--imagenet-batch {a.imagenet_batch} must be a positive multiple of --imagenet-gpus {a.imagenet_gpus}")
    if a.out:
        output_file(a.out, (".md",), "--out")  # before the measurements
    spec = read_spec_file(a.spec)
    if a.root:
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, root=a.root))
    train_default = a.train_ips is None
    if train_default and spec.data.name != "digits":
        raise UserError(f"--spec {a.spec} reads {spec.data.name}, not digits: pass --train-ips (the trainer's images/s, "
                        "e.g. from `just bench step`)")
    spec = resolved(spec)  # a missing shard set fails here, before any timing
    train_ips = DIGITS_TRAIN_IPS if train_default else a.train_ips
    batch = a.batch or spec.train.batch
    assumed = a.imagenet_step_s is None
    need = ImagenetNeed(a.imagenet_batch, a.imagenet_gpus,
                        assumed_step_s(a.imagenet_batch, a.imagenet_gpus) if assumed else a.imagenet_step_s)
    print(f"bench data: {a.spec}, batch {batch}, workers {' '.join(map(str, a.workers))}, consumer {train_ips:g} img/s",
          flush=True)
    load = load_average()
    rows = bench_stream(spec, a.workers, batch, a.batches, a.rounds, train_ips, TARGET, say=True)
    costs = read_costs(spec)
    probe = None
    if a.imagenet_probe:
        n_batches = max(1, a.imagenet_probe // need.per_process_batch)
        probe = bench_imagenet_probe(a.imagenet_probe, need, a.workers, n_batches, a.rounds, say=True)
    md = report(a.spec, spec, rows, train_default, need, assumed, probe, a.rounds, a.note, load, costs)
    print(md)
    if a.out:
        append_table(a.out, md)
