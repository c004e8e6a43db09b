"""What the data path must deliver: the digits trainer's consumption, an ImageNet-64 run's need at the paper's
batch, and one process's read and decode costs with the model of a w-worker stream built on them (the records
that `scm_graph.bench.data` measures and `scm_graph.bench.data_report` writes up)."""

from __future__ import annotations

from dataclasses import dataclass

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
