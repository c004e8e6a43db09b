"""`just bench encode`: a row per batch size with positive rates, and the table appended to --out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.encode import run
from scm_graph.data.vae import load_vae
from tests.helpers import make_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def test_rows_per_batch_size(vae_dir: Path, torch_defaults):
    rows = run(load_vae(vae_dir), 32, [1, 3], images=3)
    assert [(r.batch, r.images) for r in rows] == [(1, 3), (3, 3)]
    assert all(r.preprocess_ips > 0 and r.encode_ips > 0 and 0 < r.both_ips < r.encode_ips for r in rows)


def test_cli_appends_a_table(vae_dir: Path, tmp_path: Path, capsys, torch_defaults):
    out = tmp_path / "b.md"
    args = ["encode", "--vae", str(vae_dir), "--resolution", "32", "--images", "2", "--batch", "2", "--device", "cpu",
            "--out", str(out)]
    bench_main(args)
    bench_main(args)
    text = out.read_text()
    assert text.count("# ImageNet 32 preprocessing + VAE encoding") == 2 and "| 2 | 2 |" in text
    with pytest.raises(SystemExit) as e:
        bench_main(["encode", "--vae", str(vae_dir), "--resolution", "20", "--images", "1", "--device", "cpu"])
    assert e.value.code == 2 and "not divisible" in capsys.readouterr().err.splitlines()[-1]


def test_sd_vae_architecture():
    from scm_graph.bench.encode import sd_vae

    vae = sd_vae(torch.device("cpu"))
    cfg = vae.module.config
    assert tuple(cfg.block_out_channels) == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.latent_channels == 4 and cfg.norm_num_groups == 32 and vae.factor == 8
    assert 83e6 < sum(p.numel() for p in vae.module.parameters()) < 84e6  # the SD-VAE's 83.7M parameters
