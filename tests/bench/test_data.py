"""`just bench data`: a row per worker count with positive rates and exact ratios, the ImageNet-64 arithmetic,
the synthetic probe, the report appended to --out, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from scm_graph.bench import data_needs
from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.data import bench_imagenet_probe, bench_stream, read_costs, resolved, write_probe
from scm_graph.bench.data_needs import ImagenetNeed, ReadCosts, StreamTiming
from scm_graph.bench.data_report import stream_conclusions
from scm_graph.data import tarindex
from scm_graph.data.source import array_source
from scm_graph.data.writer import write_set
from scm_graph.specfile import read_spec_file
from tests.helpers import SPECS, one_line_error

DIGITS_SPEC = str(SPECS / "digits_sct.py")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A shard root holding a tiny stand-in `digits` set: 96 random 1x8x8 images, 10 classes, 2 shards."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(96, 1, 8, 8), dtype=np.uint8) * 15
    source = array_source("digits", "tiny digits stand-in", images, rng.integers(0, 10, 96), tuple("0123456789"))
    write_set(source, out=root, shard_size=64, progress=False)
    return root


def tiny_spec(root: Path, shuffle: int = 32):
    spec = read_spec_file(DIGITS_SPEC)
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, root=str(root), shuffle_buffer=shuffle))


def test_a_row_per_worker_count(digits_root: Path, torch_defaults):
    rows = bench_stream(tiny_spec(digits_root), [0, 1, 0], batch=16, n_batches=2, rounds=2, consumption_ips=100.0)
    assert [r.workers for r in rows] == [0, 1]  # duplicates dropped, order kept
    for r in rows:
        assert (r.batch, r.images, r.consumption_ips, r.target) == (16, 32, 100.0, 10.0)
        assert r.images_per_s > 0 and r.median_ips > 0 and r.first_batch_s > 0
        assert r.median_ips <= r.images_per_s  # the best round counts
        assert r.ratio == r.images_per_s / 100.0
        assert r.meets == (r.ratio >= 10.0)


def test_read_costs(digits_root: Path):
    costs = read_costs(resolved(tiny_spec(digits_root)))
    assert costs.images == 96 and costs.sample_bytes > 0 and costs.raw_ips > 0 and costs.decode_ips > 0
    assert costs.first_raw_ips is not None and costs.first_raw_ips > 0  # the pass that parses the tar headers
    cached = ReadCosts(96, 60.0, raw_ips=50_000.0, decode_ips=9000.0, first_raw_ips=10_000.0)
    assert "50000 img/s from the shard index cached on the first pass, which parses the tar headers at 10000" in cached.reading()
    assert "every pass parses the tar headers) runs at 10000" in ReadCosts(96, 60.0, 10_000.0, 9000.0).reading()


def test_conclusions_follow_the_rows():
    rows = [StreamTiming(0, 16, 32, 4000.0, 3900.0, 0.1, 800.0, 10.0), StreamTiming(1, 16, 32, 2000.0, 1900.0, 0.2, 800.0, 10.0)]
    text = " ".join(stream_conclusions(rows, True, ReadCosts(96, 60.0, raw_ips=6000.0, decode_ips=12_000.0)))
    assert "best is 4000.0 img/s (0 workers), 5.00x the 800.0 img/s consumer: the 10x target is not met" in text
    assert "the best is 8.36x" in text  # against the compiled sCT step's 478.3 img/s
    assert "6000 img/s (7.5x the consumer)" in text and "at most 4000 img/s (5.0x)" in text
    assert "below 10x whatever the decoding costs" in text  # the raw read alone is under 10 x 800
    assert "0.250 ms per image, 20% on top" in text and "Workers made the stream slower here (1 worker: 2000.0" in text
    fast = [dataclasses.replace(r, images_per_s=9000.0) for r in rows]
    text = " ".join(stream_conclusions(fast, False, ReadCosts(96, 60.0, raw_ips=20_000.0, decode_ips=20_000.0)))
    assert "target is met with 0 workers, 1 worker." in text and "sCT" not in text and "faster reader" not in text


def test_the_target_flag():
    row = StreamTiming(0, 16, 32, images_per_s=1000.0, median_ips=900.0, first_batch_s=0.1, consumption_ips=100.0,
                       target=10.0)
    assert row.ratio == 10.0 and row.meets
    assert not dataclasses.replace(row, images_per_s=999.0).meets
    assert dataclasses.replace(row, target=1.0, images_per_s=100.0).meets


def test_imagenet_arithmetic():
    need = ImagenetNeed(batch=2048, gpus=8, step_s=0.5)
    assert need.total_ips == 4096 and need.per_process_ips == 512 and need.per_node_ips == 4096
    assert need.per_process_batch == 256
    two_nodes = ImagenetNeed(batch=2048, gpus=16, step_s=0.5)
    assert two_nodes.per_process_ips == 256 and two_nodes.per_node_ips == 8 * 256
    # the default: EDM2-S, 102 GFLOP per forward, an sCT step of 3 x 1.59 forwards, 35% of 989 TFLOP/s
    per_gpu = 989e12 * 0.35 / (102e9 * 3 * 1.59)
    assert data_needs.ASSUMED_GPU_IPS == pytest.approx(per_gpu) and 711 < per_gpu < 712
    assert data_needs.DEFAULT_IMAGENET_STEP_S == 0.36  # 2048 / (8 x 711.5) = 0.3598 s
    assert ImagenetNeed(2048, 8, data_needs.DEFAULT_IMAGENET_STEP_S).per_process_ips == pytest.approx(2048 / 0.36 / 8)


def test_workers_model():
    costs = ReadCosts(images=10, sample_bytes=9000.0, raw_ips=10_000.0, decode_ips=5000.0)
    # every worker reads all samples (1e-4 s each) and decodes one in w (2e-4 s each)
    assert costs.bound(1) == pytest.approx(1 / (1e-4 + 2e-4))
    assert costs.bound(2) == pytest.approx(5000.0) and costs.bound(0) == costs.bound(1)
    assert costs.workers_needed(3000.0) == 1 and costs.workers_needed(4000.0) == 2
    assert costs.workers_needed(9000.0) == 18  # 1 / (1e-4 + 2e-4 / w) >= 9000  <=>  w >= 18
    assert costs.workers_needed(10_000.0) is None  # the raw read caps every worker count


def test_the_probe(tmp_path: Path, torch_defaults, monkeypatch):
    m = write_probe(tmp_path, 20)
    assert (m.count, tuple(m.shape), m.num_classes, m.labels, m.format) == (20, (3, 64, 64), 1000, True, "png")
    need = ImagenetNeed(batch=64, gpus=8, step_s=1.0)
    seen = []
    real_index = tarindex.index
    monkeypatch.setattr(tarindex, "index", lambda f, url: seen.append(tarindex.CACHE_SAMPLES) or real_index(f, url))
    probe = bench_imagenet_probe(24, need, [0], n_batches=1, rounds=1)
    assert seen and set(seen) == {0}  # ImageNet does not fit the shard index cache: the probe reads without it
    assert probe.costs.first_raw_ips is None
    assert tarindex.CACHE_SAMPLES == 250_000
    assert probe.shards == 1 and probe.costs.images == 24 and probe.costs.sample_bytes > 0
    assert probe.costs.raw_ips > 0 and probe.costs.decode_ips > 0
    (row,) = probe.rows
    assert (row.workers, row.batch, row.consumption_ips, row.target) == (0, 8, 8.0, 1.0)
    assert row.images_per_s > 0 and row.ratio == row.images_per_s / 8.0


def test_cli_appends_a_report(digits_root: Path, tmp_path: Path, capsys, torch_defaults):
    out = tmp_path / "docs" / "b.md"
    args = ["data", "--spec", DIGITS_SPEC, "--root", str(digits_root), "--workers", "0", "--batch", "16",
            "--batches", "1", "--rounds", "1", "--imagenet-probe", "16", "--imagenet-batch", "64",
            "--note", "Another job shared the machine.", "--out", str(out)]
    bench_main(args)
    printed = capsys.readouterr().out
    bench_main(args[:-2] + ["--out", str(out), "--imagenet-probe", "0", "--train-ips", "50"])
    text = out.read_text()
    assert text.count("# `just bench data`") == 2 and text.count("### Conclusions") == 2
    assert "Another job shared the machine." in text and "load average" in printed
    assert text.count("| 0 | 16 | 16 |") == 2  # workers, batch, images per round
    assert "| 0 | 8 | 16 |" in text  # the probe at the per-process batch 64 / 8, 16 images per round
    assert "828.4 img/s (the default --train-ips" in text and "50.0 img/s (--train-ips)" in text
    assert text.count("In one process, reading the raw samples") == 3  # the digits set twice, the probe once
    assert text.count("## ImageNet-64 sCT at the paper's batch: 64 images per step on 8 GPUs") == 2
    # the default step time for batch 64 on 8 GPUs at the assumed per-GPU rate, and its need per process
    step = data_needs.assumed_step_s(64, 8)
    assert f"{step:g} s per step (--imagenet-step-s; the default assumes EDM2-S" in text
    assert f"{64 / step / 8:.0f} per process**" in text


def test_bad_input_is_one_line(digits_root: Path, tmp_path: Path, capsys):
    missing = one_line_error(bench_stream, tiny_spec(tmp_path / "nowhere"), [0], 4, 1, 1, 100.0)
    assert "not found" in missing and "python -m scm_graph.shard digits" in missing
    assert "--workers must be >= 0, not -1" in one_line_error(bench_stream, tiny_spec(digits_root), [0, -1], 4, 1, 1, 100.0)
    for argv, needle in (
        (["--root", str(tmp_path / "nowhere")], "python -m scm_graph.shard digits"),
        (["--root", str(digits_root), "--workers", "-1"], "--workers must be >= 0"),
        (["--root", str(digits_root), "--train-ips", "0"], "--train-ips must be positive"),
        (["--root", str(digits_root), "--imagenet-batch", "100"], "multiple of --imagenet-gpus 8"),
        (["--spec", str(SPECS / "cifar10_sct.py")], "pass --train-ips"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_main(["data", *argv])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
