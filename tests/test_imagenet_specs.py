"""The ImageNet specs (specs/_imagenet.py and its two-line files): the files match the table, each one loads,
validates and holds the paper's settings, builds its full-size network on the meta device, and a smoke-shrunk
copy trains 2 steps."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scm_graph.model import build_model, num_params
from scm_graph.nets.sizes import EDM2_SIZES
from scm_graph.spec import validate
from scm_graph.specfile import read_spec_file
from tests.helpers import SPECS, TorchDefaults, read_metrics


def _table():
    spec = importlib.util.spec_from_file_location("_imagenet_table", SPECS / "_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_imagenet_table"] = module
    spec.loader.exec_module(module)
    return module


T = _table()
ALL = T.all_specs()


def test_every_file_is_the_table_s():
    """One file per table row, each exactly what `python specs/_imagenet.py` writes, and no stray ImageNet files."""
    want = {f"{T.spec_name(r, k, s)}.py": T.spec_file_text(r, k, s) for r, k, s in ALL}
    have = {p.name: p.read_text() for p in SPECS.glob("imagenet*.py")}
    assert have == want
    assert len(want) == 4 * 3 + 5 * 2


@pytest.mark.parametrize("row", ALL, ids=[T.spec_name(*row) for row in ALL])
def test_spec_file_loads_and_holds_the_paper_settings(row):
    r, kind, size = row
    spec = read_spec_file(SPECS / f"{T.spec_name(*row)}.py")
    validate(spec)
    assert spec == T.imagenet_spec(*row)
    o, opt, t = spec.objective, spec.optim, spec.train
    assert (t.batch, opt.kind, opt.betas, opt.eps) == (2048, "adam", (0.9, 0.99), 1e-11)
    teacher_lr = {"s": 1e-2, "m": 9e-3, "l": 8e-3, "xl": 7e-3, "xxl": 6.5e-3}[size]
    assert opt.lr == pytest.approx(teacher_lr * (1.0 if kind == "diffusion" else 0.01))
    assert spec.net.arch == "edm2" and spec.net.class_conditional
    assert spec.net.edm2.channels == {"s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}[size]
    assert t.precision == ("fp16" if r == 64 else "bf16")
    if kind == "diffusion":
        assert (o.P_mean, o.P_std) == ((-0.8, 1.6) if r == 64 else (-0.4, 1.0))
    else:
        assert o.P_mean == (-1.0 if r == 64 else -0.8) and o.P_std == 1.6
        assert "diffusion" in (o.teacher if kind == "scd" else t.init_from)
    if kind == "sct":
        assert spec.net.dropout == 0.45 and spec.net.edm2.dropout_resolutions == (16, 8)
    if r == 512:
        assert spec.data.normalize == "channel"
        assert spec.data.mean == (1.56, -0.695, 0.483, 0.729) and spec.data.std == (5.27, 5.91, 4.21, 4.31)
    else:
        assert spec.data.normalize == "pixel"


# ---------------------------------------------------------------------------------------------
# The full-size networks on the meta device, and smoke-shrunk runs of every spec


def _resolved(spec, channels: int):
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=64, channels=channels, num_classes=1000))


@pytest.mark.parametrize("row", ALL, ids=[T.spec_name(*row) for row in ALL])
def test_full_size_network_builds_on_the_meta_device(row):
    """The spec's own network (no memory): its parameter count is within 10% of the paper's for its size."""
    r, kind, size = row
    spec = _resolved(T.imagenet_spec(*row), 3 if r == 64 else 4)
    with torch.device("meta"):
        model = build_model(spec)
    n = num_params(model.net)
    paper = EDM2_SIZES[size.upper()].paper_params
    assert abs(n / paper - 1) < 0.10, (n, paper)
    assert model.takes_guidance == (kind == "scd")


# Shrinks an ImageNet spec to a CPU smoke run (2 steps of 4 images, eager).
SHRINK = [
    "--net.edm2.channels", "8", "--net.edm2.num_blocks", "1", "--net.edm2.head_dim", "8",
    "--train.batch", "4", "--train.total_images", "8", "--train.log_every_images", "4",
    "--train.sample_every_images", "1000000", "--train.grid_samples", "4", "--train.ckpt_every_images", "1000000", "--train.compile", "false",
    "--train.device", "cpu", "--data.workers", "0", "--data.shuffle_buffer", "4",
]


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory) -> Path:
    """Tiny stand-ins with the real shapes: `imagenet64` (3x64x64 pixels) and `imagenet512-sdvae` (4x64x64
    float16 posteriors, a tiny VAE that decodes them), 3 classes each."""
    from scm_graph.data.source import array_source
    from scm_graph.data.writer import write_set
    from tests.data.latentsets import write_latent_set
    from tests.helpers import make_tiny_vae

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 3, 64, 64), dtype=np.uint8)
    write_set(array_source("imagenet64", "test", images, np.arange(12) % 3, ("a", "b", "c")), root, progress=False)
    mean = rng.normal(0, 5, size=(12, 4, 64, 64))
    std = rng.uniform(0.05, 0.5, size=(12, 4, 64, 64))
    posterior = np.concatenate([mean, std], axis=1).astype(np.float16)
    vae = make_tiny_vae(root / "vae")
    write_latent_set(root, "imagenet512-sdvae", posterior, np.arange(12) % 3, num_classes=3, vae=str(vae.resolve()))
    return root


@pytest.fixture(scope="module")
def teachers(imagenet_shards: Path) -> dict[int, Path]:
    """A smoke-shrunk diffusion teacher per resolution (the S spec's), for the sCT and sCD specs to start from."""
    out = {}
    for r in (64, 512):
        run = imagenet_shards / "runs" / f"teacher{r}"
        _smoke(f"imagenet{r}_diffusion_s.py", imagenet_shards, run)
        out[r] = run / "ckpt.safetensors"
    return out


def _smoke(spec_file: str, root: Path, out: Path, *extra: str) -> None:
    from scm_graph.train.cli import main

    with TorchDefaults():
        main([str(SPECS / spec_file), *SHRINK, "--data.root", str(root), "--train.out", str(out), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("row", ALL, ids=[T.spec_name(*row) for row in ALL])
def test_smoke_shrunk_spec_trains_two_steps(row, imagenet_shards: Path, teachers: dict[int, Path]):
    """The spec with a tiny network and batch trains 2 steps on stand-in shards of its real shape (its
    precision, optimiser, schedule, objective and, for sCT / sCD, its teacher's network)."""
    r, kind, size = row
    extra: list[str] = []
    if kind == "sct":
        extra = ["--train.init_from", str(teachers[r])]
    if kind == "scd":
        extra = ["--objective.teacher", str(teachers[r])]
    out = imagenet_shards / "runs" / T.spec_name(*row)
    _smoke(f"{T.spec_name(*row)}.py", imagenet_shards, out, *extra)
    ends = [rec for rec in read_metrics(out) if rec.get("event") == "end"]
    assert ends and ends[-1]["images"] == 8
    assert (out / "ckpt.safetensors").is_file() and list((out / "grids").glob("*.png"))
