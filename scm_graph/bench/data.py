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
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm_graph.bench.common import append_table, device_name
from scm_graph.data import tarindex
from scm_graph.data.manifest import Manifest, resolve_spec
from scm_graph.data.stream import CHUNK, _decode, _read_shards, batches, open_shards
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_file
from scm_graph.spec import DataSpec, Spec
from scm_graph.specfile import read_spec_file

TARGET = 10.0
"""The digits stream must deliver at least this many times what the trainer consumes (the issue's bar)."""
DIGITS_TRAIN_IPS = 828.4
"""Default `--train-ips` for the digits specs: the compiled diffusion step at batch 128 in docs/bench_step_cpu.md
("Earlier measurement", 2-core AMD EPYC), the fastest, so the most demanding, digits consumer measured there (the
Intel box's quiet run in the same file reached 894 img/s)."""
DIGITS_SCT_IPS = 478.3
"""The compiled sCT step at batch 128 in docs/bench_step_cpu.md ("Earlier measurement"), quoted beside the default consumer."""
STEP_MACHINE = "measured there on an AMD EPYC with 2 threads"

IMAGENET_BATCH = 2048
"""The paper's ImageNet batch (sCM on EDM2 config G; `specs/_imagenet.py` BATCH, docs/imagenet.md)."""
IMAGENET_GPUS = 8
GPUS_PER_NODE = 8
# No GPU step time is measured in docs/ yet (docs/imagenet.md, "Step speed"), so the default step time is
# derived from an assumption, stated in the report and overridable with --imagenet-step-s:
EDM2_S_GFLOP = 102.0
"""One forward of EDM2-S at ImageNet 64 (EDM2 paper, Table 3), the smallest, so fastest, sCT student."""
SCT_FORWARDS = 3 * 1.59
"""An sCT step in forward-equivalents: a diffusion step (forward + backward) is about 3, and the sCT step of
EDM2-S costs 1.59x the diffusion step (docs/imagenet.md, "Step speed")."""
H100_TFLOPS = 989.0
"""An H100 SXM's dense fp16 tensor-core peak."""
H100_UTILISATION = 0.35
"""The fraction of that peak the step is assumed to reach."""
ASSUMED_GPU_IPS = H100_TFLOPS * 1e12 * H100_UTILISATION / (EDM2_S_GFLOP * 1e9 * SCT_FORWARDS)
"""About 711 img/s per H100 for the EDM2-S sCT step at 64x64, fp16."""


def assumed_step_s(batch: int = IMAGENET_BATCH, gpus: int = IMAGENET_GPUS) -> float:
    """Seconds per step of `batch` images on `gpus` GPUs at ASSUMED_GPU_IPS each, to two significant digits."""
    return float(f"{batch / (gpus * ASSUMED_GPU_IPS):.2g}")


DEFAULT_IMAGENET_STEP_S = assumed_step_s()
"""0.36 s per step of 2048 images on 8 H100s."""
ASSUMPTION = (f"EDM2-S (the smallest, fastest student) at {EDM2_S_GFLOP:g} GFLOP per forward (EDM2, Table 3), "
              f"an sCT step of 3 x 1.59 = {SCT_FORWARDS:.2f} forward-equivalents (a diffusion step's forward + "
              f"backward, times the sCT / diffusion step ratio of docs/imagenet.md), at "
              f"{H100_UTILISATION:.0%} of an H100's {H100_TFLOPS:g} dense fp16 TFLOP/s: about "
              f"{ASSUMED_GPU_IPS:.0f} img/s per GPU")

SPEC_WORKERS = 4
"""`data.workers` of the ImageNet specs (`specs/_imagenet.py`)."""

PROBE_NAME = "imagenet64-probe"
PROBE_RESOLUTION = 64
PROBE_CLASSES = 1000
PROBE_SHARD_SIZE = 512
PROBE_NOISE = 8.0
"""Std (uint8 units) of the noise on the probe's smooth colour fields: about 9 KB per 64x64 PNG."""


@dataclass
class StreamTiming:
    """One stream, one worker count: images/s of decoded, normalised batches against a consumer."""

    workers: int
    batch: int
    images: int
    """Images per timed round."""
    images_per_s: float
    """Best round."""
    median_ips: float
    """Median round."""
    first_batch_s: float
    """The untimed first batch: opening the shards, filling the shuffle buffer, starting the workers."""
    consumption_ips: float
    """Images/s the trainer consumes."""
    target: float
    """The ratio the stream must reach."""

    @property
    def ratio(self) -> float:
        return self.images_per_s / self.consumption_ips

    @property
    def meets(self) -> bool:
        return self.ratio >= self.target


@dataclass
class ImagenetNeed:
    """The decoded images/s an ImageNet run needs at `batch` images per step of `step_s` seconds on `gpus` GPUs."""

    batch: int
    gpus: int
    step_s: float

    @property
    def total_ips(self) -> float:
        return self.batch / self.step_s

    @property
    def per_process_ips(self) -> float:
        return self.total_ips / self.gpus

    @property
    def per_process_batch(self) -> int:
        return self.batch // self.gpus

    @property
    def per_node_ips(self) -> float:
        return self.per_process_ips * min(self.gpus, GPUS_PER_NODE)


@dataclass
class ReadCosts:
    """One process's rates over a shard set: reading its raw samples (tar members grouped, nothing decoded) and
    decoding them (checksum, PNG or npy, label); and the mean size of a sample's image member. `raw_ips` is the
    rate of the passes a stream makes (the shard index cached when the set fits `tarindex.CACHE_SAMPLES`),
    `first_raw_ips` that of the first pass, which parses the tar headers (None when the set does not fit the cache,
    so that every pass does)."""

    images: int
    sample_bytes: float
    raw_ips: float
    decode_ips: float
    first_raw_ips: float | None = None

    def reading(self) -> str:
        """'reading the raw samples ... runs at R img/s ...' for the reports."""
        if self.first_raw_ips is None:
            return f"reading the raw samples (nothing decoded; every pass parses the tar headers) runs at {self.raw_ips:.0f} img/s"
        return (f"reading the raw samples (nothing decoded) runs at {self.raw_ips:.0f} img/s from the shard index "
                f"cached on the first pass, which parses the tar headers at {self.first_raw_ips:.0f} img/s")

    def bound(self, workers: int) -> float:
        """Images/s a `workers`-worker stream can reach at best: every worker reads every raw sample and decodes
        one in `workers` (`data.stream`), each on a core of its own; the main process's share (collation, the
        hand-over of each chunk of decoded images) is left out, so this is an upper bound."""
        return 1.0 / (1.0 / self.raw_ips + 1.0 / (max(workers, 1) * self.decode_ips))

    def workers_needed(self, need_ips: float, most: int = 64) -> int | None:
        """The fewest workers whose bound reaches `need_ips`; None when none up to `most` (or ever) does."""
        return next((w for w in range(1, most + 1) if self.bound(w) >= need_ips), None)


@dataclass
class ImagenetProbe:
    """The synthetic ImageNet-64 set's one-process costs and its stream's rows."""

    costs: ReadCosts
    rows: list[StreamTiming]
    shards: int


# ---------------------------------------------------------------------------------------------
# Measuring


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
    """Read the set's shards once (raw samples), then decode every sample, in this process (what a stream does
    per sample, without the shuffle, the batching and the normalisation)."""
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


# ---------------------------------------------------------------------------------------------
# Report


def load_average() -> tuple[float, float, float] | None:
    """The 1 / 5 / 15 minute load averages, where the system has them."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _machine(note: str, load: tuple[float, float, float] | None) -> str:
    threads = torch.get_num_threads()
    text = f"Machine: {os.cpu_count()} CPUs"
    if load:
        text += ", load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the start".format(*load)
    text += f"; torch {torch.__version__}, {threads} intra-op thread{'s' if threads != 1 else ''}."
    return f"{text} {note.strip()}" if note.strip() else text


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _workers(w: int) -> str:
    return f"{w} worker{'s' if w != 1 else ''}"


def stream_table(rows: list[StreamTiming], versus: str) -> str:
    """One row per worker count; `versus` names the consumer in the ratio's column."""
    lines = [
        (f"| workers | batch | images / round | img/s (best) | img/s (median) | first batch (s) | x {versus} "
         f"| >= {rows[0].target:g}x |"),
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.workers} | {r.batch} | {r.images} | {_fmt(r.images_per_s)} | {_fmt(r.median_ips)} | "
                     f"{r.first_batch_s:.2f} | {r.ratio:.2f}x | {'yes' if r.meets else 'no'} |")
    return "\n".join(lines)


def stream_conclusions(rows: list[StreamTiming], train_default: bool, costs: ReadCosts | None = None) -> list[str]:
    best = max(rows, key=lambda r: r.images_per_s)
    c = best.consumption_ips
    met = [_workers(r.workers) for r in rows if r.meets]
    verdict = f"met with {', '.join(met)}" if met else "not met with any worker count measured"
    out = [(f"The stream's best is {_fmt(best.images_per_s)} img/s ({_workers(best.workers)}), {best.ratio:.2f}x "
            f"the {_fmt(c)} img/s consumer: the {best.target:g}x target is {verdict}.")]
    if train_default:
        out.append(f"Against the compiled sCT step ({_fmt(DIGITS_SCT_IPS)} img/s) the best is "
                   f"{best.images_per_s / DIGITS_SCT_IPS:.2f}x.")
    if costs is not None:
        cap = costs.raw_ips / c
        out.append(f"Every worker reads every raw sample, so no worker count passes the one-process raw read, "
                   f"{costs.raw_ips:.0f} img/s ({cap:.1f}x the consumer); with the decoding ({costs.decode_ips:.0f} "
                   f"img/s) one process comes to at most {costs.bound(1):.0f} img/s ({costs.bound(1) / c:.1f}x) before "
                   "shuffling, batching and normalising"
                   + (f": below {best.target:g}x whatever the decoding costs, so the target needs a faster reader."
                      if cap < best.target else "."))
    zero = next((r for r in rows if r.workers == 0), None)
    if zero is not None:
        out.append(f"With 0 workers the stream runs in the training process between steps: "
                   f"{1e3 / zero.images_per_s:.3f} ms per image, {c / zero.images_per_s:.0%} on top of the step's time "
                   f"at {_fmt(c)} img/s.")
        slower = [r for r in rows if r.workers > 0 and r.images_per_s < zero.images_per_s]
        if slower:
            which = ", ".join(f"{_workers(r.workers)}: {_fmt(r.images_per_s)}" for r in slower)
            out.append(f"Workers made the stream slower here ({which} img/s): every worker reads every raw sample "
                       f"and decodes only its share, its decoded images cross to the main process in chunks of {CHUNK}, "
                       "and the processes share this machine's cores.")
    return out


def imagenet_section(need: ImagenetNeed, assumed: bool, probe: ImagenetProbe | None) -> str:
    nodes = math.ceil(need.gpus / GPUS_PER_NODE)
    step = (f"{need.step_s:g} s per step (--imagenet-step-s; the default assumes {ASSUMPTION}, as no GPU step time "
            "is measured in docs/ yet)" if assumed else f"{need.step_s:g} s per step (--imagenet-step-s)")
    lines = [
        f"## ImageNet-64 sCT at the paper's batch: {need.batch} images per step on {need.gpus} GPUs",
        "",
        (f"Batch {need.batch} (sCM Appendix G on EDM2 config G; `specs/_imagenet.py` BATCH, docs/imagenet.md), "
         f"{need.gpus} processes ({nodes} node{'s' if nodes > 1 else ''} of up to {GPUS_PER_NODE} GPUs), {step}. "
         f"That needs **{need.total_ips:.0f} decoded img/s in all, {need.per_node_ips:.0f} per node and "
         f"{need.per_process_ips:.0f} per process** ({need.per_process_batch} images per process per step)."),
        "",
    ]
    if probe is None:
        return "\n".join(lines)
    costs = probe.costs
    lines += [
        (f"Probe: {costs.images} synthetic {PROBE_RESOLUTION}x{PROBE_RESOLUTION} RGB PNGs (smooth random colour "
         f"fields plus N(0, {PROBE_NOISE:g}) noise, {costs.sample_bytes / 1e3:.1f} KB per PNG on average; labels "
         f"0..{PROBE_CLASSES - 1}; checksums) written by the project's shard writer in {probe.shards} shards of up to "
         f"{PROBE_SHARD_SIZE}, streamed with the ImageNet-64 specs' data settings (pixel normalisation, shuffle buffer "
         f"{DataSpec().shuffle_buffer}) at the per-process batch, against the per-process need (target 1x: keeping "
         f"up), with the shard index cache off (ImageNet's 1.28 M samples exceed it, so a real run parses most "
         f"shards' headers on every pass). In one process, {costs.reading()} and decoding them (checksum, PNG, "
         f"label) at {costs.decode_ips:.0f} img/s."),
        "",
        stream_table(probe.rows, "need per process"),
        "",
    ]
    return "\n".join(lines)


def imagenet_conclusions(need: ImagenetNeed, probe: ImagenetProbe | None) -> list[str]:
    per_process, per_node = need.per_process_ips, need.per_node_ips
    if probe is None:
        return [(f"An ImageNet-64 run at {need.step_s:g} s per step needs {per_process:.0f} decoded img/s per "
                 f"process, {per_node:.0f} per node (--imagenet-probe N measures the decoding).")]
    costs, rows = probe.costs, probe.rows
    best = max(rows, key=lambda r: r.images_per_s)
    out = [(f"ImageNet-64 needs {per_process:.0f} decoded img/s per process; the probe's stream gave at best "
            f"{best.images_per_s:.0f} img/s ({_workers(best.workers)}), {best.ratio:.2f}x that, on this machine.")]
    zero = next((r for r in rows if r.workers == 0), None)
    if zero is not None:
        out.append(f"With 0 workers the decoding would take {per_process / zero.images_per_s:.0%} of each training "
                   "process's time, which that process needs to keep its GPU fed: use workers.")
    cap = f"every worker reads every raw sample, so no worker count passes {costs.raw_ips:.0f} img/s per process"
    w = costs.workers_needed(per_process)
    if w is None:
        out.append(f"No worker count is enough: {cap}.")
        return out
    trainers = min(need.gpus, GPUS_PER_NODE)
    measured = [r for r in rows if r.workers > 0]
    share = min(r.images_per_s / costs.bound(r.workers) for r in measured) if measured else 1.0
    out.append(
        f"By the model of a w-worker stream (each worker on a core of its own reads every raw sample at "
        f"{costs.raw_ips:.0f} img/s and decodes one in w at {costs.decode_ips:.0f} img/s; the main process's collation "
        f"and the hand-over of the decoded chunks left out, so an upper bound), {_workers(w)} per GPU "
        f"{'reaches' if w == 1 else 'reach'} {costs.bound(w):.0f} img/s per process: {w * trainers} decode processes "
        f"per node beside the {trainers} trainers. The ImageNet specs' `data.workers` {SPEC_WORKERS} gives "
        f"{costs.bound(SPEC_WORKERS):.0f} img/s by the model ({costs.bound(SPEC_WORKERS) / per_process:.1f}x the need); "
        f"{cap}.")
    if measured:
        which = ", ".join(f"{_workers(r.workers)} {r.images_per_s:.0f} img/s ({r.images_per_s / costs.bound(r.workers):.0%} "
                          f"of {costs.bound(r.workers):.0f})" for r in measured)
        w_low = costs.workers_needed(per_process / share)
        then = (f"{_workers(w_low)} per GPU" if w_low is not None else "no worker count")
        out.append(f"Measured here against the model: {which}. At the lowest of those shares ({share:.0%}) the "
                   f"model asks for {then}.")
    return out


def report(spec_path: str, spec: Spec, rows: list[StreamTiming], train_default: bool, need: ImagenetNeed,
           assumed: bool, probe: ImagenetProbe | None, rounds: int, note: str = "",
           load: tuple[float, float, float] | None = None, costs: ReadCosts | None = None) -> str:
    """The whole markdown report: title, machine, the stream's table, the ImageNet-64 section, conclusions."""
    d, r0 = spec.data, rows[0]
    n_batches = r0.images // r0.batch
    if train_default:
        consumer = (f"{_fmt(r0.consumption_ips)} img/s (the default --train-ips: the compiled diffusion step at batch "
                    f"128 in docs/bench_step_cpu.md, {STEP_MACHINE}, the most demanding digits consumer measured; the "
                    f"compiled sCT step there takes {_fmt(DIGITS_SCT_IPS)} img/s)")
    else:
        consumer = f"{_fmt(r0.consumption_ips)} img/s (--train-ips)"
    lines = [
        f"# `just bench data`: the shard stream against the trainer — {spec_path} — {device_name(torch.device('cpu'))}",
        "",
        _machine(note, load),
        "",
        (f"Stream: `data.stream.batches` over {Path(d.root) / d.name} ({d.channels}x{d.resolution}x{d.resolution}, "
         f"normalise '{d.normalize}', shuffle buffer {d.shuffle_buffer}) at batch {r0.batch}: samples checked, "
         "decoded, batched and normalised. The first batch is not timed (it opens the shards, fills the shuffle "
         f"buffer and starts the workers); then {rounds} round{'s' if rounds != 1 else ''} of {n_batches} "
         f"batch{'es' if n_batches != 1 else ''}; the best round counts. Consumer: {consumer}."
         + (f" In one process, {costs.reading()} and decoding them (checksum, image, label) at "
            f"{costs.decode_ips:.0f} img/s." if costs is not None else "")),
        "",
        stream_table(rows, "consumer"),
        "",
        imagenet_section(need, assumed, probe),
        "### Conclusions",
        "",
    ]
    lines += [f"- {s}" for s in stream_conclusions(rows, train_default, costs) + imagenet_conclusions(need, probe)]
    return "\n".join(lines) + "\n"


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
