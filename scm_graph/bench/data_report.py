"""The markdown report of `just bench data`: the stream's tables, the ImageNet-64 section and the conclusions."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from scm_graph.bench.common import device_name
from scm_graph.bench.data_needs import (
    ASSUMPTION,
    DIGITS_SCT_IPS,
    GPUS_PER_NODE,
    PROBE_CLASSES,
    PROBE_NOISE,
    PROBE_RESOLUTION,
    PROBE_SHARD_SIZE,
    SPEC_WORKERS,
    STEP_MACHINE,
    ImagenetNeed,
    ImagenetProbe,
    ReadCosts,
    StreamTiming,
)
from scm_graph.data.stream import CHUNK
from scm_graph.spec import DataSpec, Spec


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
