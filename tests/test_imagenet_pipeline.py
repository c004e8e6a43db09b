"""ImageNet 512's pipeline end to end at toy size: a class-folder tree of JPEGs -> `shard imagenet --vae` (a tiny
random AutoencoderKL) -> 2 training steps of an ImageNet 512 spec on the latents -> `python -m scm_graph.sample`
decodes them to a PNG of images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scm_graph.shard import main as shard_main
from tests.data.test_imagenet import _jpeg
from tests.helpers import SPECS, TorchDefaults, make_tiny_vae, read_metrics, run_cli


@pytest.mark.slow
def test_jpegs_to_latent_shards_to_training_to_decoded_png(tmp_path: Path):
    src = tmp_path / "imagenet" / "train"
    for i in range(6):
        _jpeg(src / ("n01440764", "n09999999")[i % 2] / f"img{i}.JPEG", 150 + 7 * i, 130, seed=i)
    vae = make_tiny_vae(tmp_path / "vae")
    root = tmp_path / "shards"
    with TorchDefaults():
        shard_main(["imagenet", "--src", str(src.parent), "--resolution", "128", "--vae", str(vae), "--out", str(root),
                    "--shard-size", "4", "--device", "cpu"])
    manifest = json.loads((root / "imagenet128-sdvae" / "manifest.json").read_text())
    assert manifest["shape"] == [4, 16, 16] and manifest["format"] == "npy" and manifest["num_classes"] == 2
    assert manifest["latent"]["vae"] == str(vae.resolve()) and manifest["latent"]["image_resolution"] == 128

    from scm_graph.train.cli import main as train_main

    run = tmp_path / "run"
    with TorchDefaults():
        train_main([str(SPECS / "imagenet512_diffusion_s.py"), "--data.root", str(root), "--data.name", "imagenet128-sdvae",
                    "--data.workers", "0", "--net.edm2.channels", "8", "--net.edm2.channel_mult", "1", "2",
                    "--net.edm2.num_blocks", "1", "--net.edm2.head_dim", "8", "--train.batch", "2",
                    "--train.total_images", "4", "--train.grid_samples", "4", "--train.compile", "false",
                    "--train.device", "cpu", "--train.out", str(run)])
    assert [r["images"] for r in read_metrics(run) if r.get("event") == "end"] == [4]

    out = tmp_path / "samples" / "grid.png"
    res = run_cli("scm_graph.sample", "--ckpt", run / "ckpt.safetensors", "--steps", "4", "--n", "4", "--out", out,
                  "--npz", tmp_path / "samples" / "s.npz", "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    samples = np.load(tmp_path / "samples" / "s.npz")
    assert samples["samples"].shape == (4, 3, 128, 128) and samples["samples"].dtype == np.uint8  # decoded images
    assert samples["x"].shape == (4, 4, 16, 16)  # the latents, model units
    with Image.open(out) as grid:
        assert grid.mode == "RGB" and min(grid.size) > 2 * 128
