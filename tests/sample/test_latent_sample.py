"""A tiny class-conditional model on SD-VAE latents (4 x 4 x 4, a random tiny AutoencoderKL: 32 x 32 images),
trained by the training CLI: its grids and the sampler's output are decoded images; --vae; one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scm_graph.eval.cli as eval_cli
import scm_graph.sample.cli as sample_cli
from scm_graph.data.normalize import denormalize
from scm_graph.data.vae import decode, load_vae
from scm_graph.sample.generate import generate, load_decoder, load_generator, to_images
from tests.data.latentsets import encode_latent_set
from tests.helpers import (
    TorchDefaults,
    assert_user_error,
    make_tiny_vae,
    run_cli,
    tiny_spec,
    train_main,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("torch_defaults")

LATENT_ARGS = ("--data.name", "lat", "--net.class_conditional", "true")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """{vae, root, out, ckpt}: a 48-sample latent set encoded by a tiny VAE, and 2 training steps of 16 on it."""
    base = tmp_path_factory.mktemp("latent")
    with TorchDefaults():
        vae = make_tiny_vae(base / "vae")
        encode_latent_set(base / "shards", "lat", vae)
    ckpt = train_tiny("digits_sct.py", base / "shards", base / "run", 32, *LATENT_ARGS)
    return {"vae": vae.resolve(), "root": base / "shards", "out": base / "run", "ckpt": ckpt}


def _one_line_exit(capsys, main, argv: list[str], *needles: str) -> str:
    """main(argv) exits 2 with exactly one stderr line `error: ...` containing every needle; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- training


def test_training_records_the_vae_and_decodes_its_grid(run):
    start = json.loads((run["out"] / "metrics.jsonl").read_text().splitlines()[0])
    data = start["spec"]["data"]
    assert data["vae"] == str(run["vae"]) and data["channels"] == 4 and data["resolution"] == 4
    with Image.open(run["out"] / "grids" / f"grid-{32:012d}.png") as im:  # 64 decoded 32x32 RGB images, 8 a row
        assert im.mode == "RGB" and im.size == (8 * 65 + 1, 8 * 65 + 1)  # 32 px -> 64 px cells, 1 px pad


def test_training_without_its_vae_stops_at_the_start(run, tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["--data.root", run["root"], "--train.out", out, "--train.total_images", "16", "--train.device", "cpu",
            "--train.compile", "false", *LATENT_ARGS]
    _one_line_exit(capsys, lambda a: train_main("digits_sct.py", *a), [*args, "--data.vae", tmp_path / "nope"],
                   f"the VAE folder {tmp_path / 'nope'} (data.vae) is missing; pass --data.vae PATH")
    assert not out.exists()  # nothing was written
    (tmp_path / "empty").mkdir()
    _one_line_exit(capsys, lambda a: train_main("digits_sct.py", *a), [*args, "--data.vae", tmp_path / "empty"],
                   f"data.vae {tmp_path / 'empty'} is not a diffusers AutoencoderKL folder (no config.json)")
    assert not out.exists()


# ----------------------------------------------------------------------------- sampling


def test_sample_cli_writes_decoded_images(run, tmp_path: Path):
    sample_cli.main(["--ckpt", str(run["ckpt"]), "--n", "4", "--label", "1", "3", "--out", str(tmp_path / "g.png"),
                     "--npz", str(tmp_path / "g.npz")])
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "RGB" and im.size == (2 * 65 + 1, 2 * 65 + 1)
    d = _npz(tmp_path / "g.npz")
    assert d["samples"].dtype == np.uint8 and d["samples"].shape == (4, 3, 32, 32)
    assert d["x"].dtype == np.float32 and d["x"].shape == (4, 4, 4, 4)
    g = load_generator(run["ckpt"])
    x = generate(g, 4, steps=2, labels=torch.tensor([1, 3, 1, 3]))
    assert np.array_equal(d["x"], x.numpy())
    # the images are the VAE's decoding of the denormalised latents
    raw = denormalize(x, g.spec.data, g.sigma_d)  # z = x / sigma_d * std + mean
    assert np.array_equal(d["samples"], decode(load_vae(run["vae"]), raw).numpy())
    assert d["samples"].std() > 0


def test_to_images_decodes_in_batches(run):
    g = load_generator(run["ckpt"])
    x = generate(g, 5, steps=1, seed=3)
    assert g.vae is None
    whole = to_images(g, x, batch=8)
    assert g.vae is not None and g.vae.path == str(run["vae"])  # loaded on first use, then kept
    assert torch.equal(to_images(g, x, batch=2), whole)


def test_vae_flag_overrides_a_moved_vae(run, tmp_path: Path, capsys):
    ref = tmp_path / "ref.npz"
    sample_cli.main(["--ckpt", str(run["ckpt"]), "--n", "4", "--out", str(tmp_path / "ref.png"), "--npz", str(ref)])
    moved = tmp_path / "moved-vae"
    shutil.move(run["vae"], moved)
    try:
        _one_line_exit(capsys, sample_cli.main, ["--ckpt", run["ckpt"], "--out", tmp_path / "g.png"],
                       f"the VAE folder {run['vae']} (data.vae) is missing; pass --vae PATH")
        assert not (tmp_path / "g.png").exists()
        sample_cli.main(["--ckpt", str(run["ckpt"]), "--n", "4", "--out", str(tmp_path / "g.png"),
                         "--npz", str(tmp_path / "g.npz"), "--vae", str(moved)])
    finally:
        shutil.move(moved, run["vae"])
    a, b = _npz(ref), _npz(tmp_path / "g.npz")
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["samples"], b["samples"])


def test_bad_vae_flag_is_one_line(run, tmp_path: Path, capsys):
    base = ["--ckpt", run["ckpt"], "--out", tmp_path / "g.png"]
    _one_line_exit(capsys, sample_cli.main, [*base, "--vae", tmp_path / "nope"],
                   f"--vae {tmp_path / 'nope'} is not a folder")
    (tmp_path / "empty").mkdir()
    _one_line_exit(capsys, sample_cli.main, [*base, "--vae", tmp_path / "empty"],
                   f"--vae {tmp_path / 'empty'} is not a diffusers AutoencoderKL folder (no config.json)")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    _one_line_exit(capsys, sample_cli.main, [*base, "--vae", tmp_path / "unet"],
                   f"--vae {tmp_path / 'unet'}: cannot load a diffusers AutoencoderKL (its config.json describes a 'UNet2DModel'")
    three = make_tiny_vae(tmp_path / "vae3", latent_channels=3)
    _one_line_exit(capsys, sample_cli.main, [*base, "--vae", three],
                   f"--vae {three} decodes 3-channel latents, but this model samples 4 channels")
    assert not (tmp_path / "g.png").exists()


def test_vae_flag_on_a_pixel_model_is_one_line():
    from tests.helpers import one_line_error

    msg = one_line_error(load_decoder, tiny_spec(), "cpu", "/some/vae")
    assert msg == "--vae given but this model samples pixels, not VAE latents"
    assert load_decoder(tiny_spec(), "cpu") is None


@pytest.mark.slow
def test_sample_and_eval_subprocesses(run, tmp_path: Path):
    res = run_cli("scm_graph.sample", "--ckpt", run["ckpt"], "--n", "9", "--out", "g.png", "--vae", run["vae"],
                  cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "RGB" and im.size == (3 * 65 + 1, 3 * 65 + 1)
    res = run_cli("scm_graph.sample", "--ckpt", run["ckpt"], "--out", "h.png", "--vae", tmp_path / "g.png",
                  cwd=tmp_path, timeout=120)
    assert_user_error(res, f"--vae {tmp_path / 'g.png'} is not a folder")
    assert not (tmp_path / "h.png").exists()
    res = run_cli("scm_graph.eval", "--ckpt", run["ckpt"], cwd=tmp_path, timeout=120)
    assert_user_error(res, f"{run['ckpt']} is not a digits model")


def test_eval_of_a_latent_checkpoint_needs_an_image_metric(run, capsys):
    """The digits FD does not apply to a latent model: without --metric it is one line asking for fid / fd_dinov2
    (tests/eval/test_stream.py scores a latent model's decoded samples)."""
    line = _one_line_exit(capsys, eval_cli.main, ["--ckpt", run["ckpt"]])
    assert line == f"error: {run['ckpt']} is not a digits model: pass --metric fid and/or fd_dinov2 with --ref FILE"
    line = _one_line_exit(capsys, eval_cli.main, ["--ckpt", run["ckpt"], "--metric", "fd_digits"])
    assert line.startswith("error: fd_digits scores the 8x8 digits only")
