"""Smoke runs: every spec file trains end to end through the CLI (tiny networks), fp32 and bf16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import scm_graph.train.cli as cli
from scm_graph.checkpoint import load_checkpoint
from scm_graph.spec import spec_from_json
from tests.helpers import SPECS, STEP_KEYS, read_metrics, run_cli, step_records, tiny_args

SMOKE = ["digits_sct", "digits_diffusion", "cifar10_sct", "cifar10_diffusion", "my_images_sct", "digits_ict", "cifar10_ict"]
ATTN_SMOKE = ["digits_sct_attn", "digits_dit"]  # test_smoke_run_attention_nets_bf16
SCD_SMOKE = {"digits_teacher": None, "digits_scd": "digits_teacher", "cifar10_scd": "cifar10_diffusion"}  # spec: its teacher


def test_every_spec_has_a_smoke_run():
    """Each file in specs/ is run by a smoke test, and each smoke name is a file: a new spec needs a smoke run,
    a renamed one fails here (and in test_smoke_run) instead of vanishing."""
    from tests.test_imagenet_specs import ALL, T  # the ImageNet specs' smoke runs live there

    files = sorted(p.stem for p in SPECS.glob("*.py") if not p.name.startswith("_"))
    assert files, SPECS
    imagenet = {T.spec_name(*row) for row in ALL}
    smoked = set(SMOKE) | set(ATTN_SMOKE) | set(SCD_SMOKE) | imagenet
    assert not set(files) - smoked, f"specs without a smoke run: {sorted(set(files) - smoked)}"
    assert not smoked - set(files), f"smoke runs without a spec file: {sorted(smoked - set(files))}"
    assert len(smoked) == len(SMOKE) + len(ATTN_SMOKE) + len(SCD_SMOKE) + len(imagenet)


@pytest.mark.slow
def test_smoke_run_bf16(tmp_path: Path, shard_root: Path):
    """`python -m scm_graph.train specs/digits_sct.py --train.precision bf16` runs and writes a checkpoint."""
    run = tmp_path / "run"
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, run, 32, "--train.precision", "bf16"),
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("done:") and "fd_1step" in res.stdout and "warning" not in res.stdout
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert (ck.step, ck.images) == (2, 32) and spec_from_json(ck.spec_json).train.precision == "bf16"
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck.net.values())
    recs = step_records(run)
    assert all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 and r["skipped"] == 0 for r in recs.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKE)
def test_smoke_run(tmp_path: Path, shard_root: Path, name: str):
    path = SPECS / f"{name}.py"
    assert path.is_file(), f"specs/{name}.py is missing: a smoke-tested spec was renamed or removed"
    digits = name.startswith("digits")
    steps = 3 if digits else 2
    run = tmp_path / "run"
    # cifar: the synthetic 3x32x32 set in shard_root, read through one DataLoader worker (the spec asks for 4)
    extra = () if digits else ("--data.name", "cifar10", "--data.workers", "1")
    args = [str(path), *tiny_args(shard_root, run, 16 * steps, *extra)]
    if name == "digits_sct":  # one true CLI run
        res = run_cli("scm_graph.train", *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("done:") and "fd_1step" in res.stdout
    else:
        cli.main(args)

    ck = load_checkpoint(run / "ckpt.safetensors")
    spec = spec_from_json(ck.spec_json)
    assert (ck.step, ck.images) == (steps, 16 * steps) and ck.ema is not None and ck.optim is not None
    assert ck.meta["objective"] == spec.objective.kind == next(k for k in ("diffusion", "ict", "sct") if k in name or k == "sct")
    assert (spec.data.channels, spec.data.resolution) == ((1, 8) if digits else (3, 32))

    recs = read_metrics(run)
    assert recs[0]["event"] == "start" and recs[0]["params"] > 0 and recs[0]["spec"]["name"] == name
    assert recs[-1]["event"] == "end" and recs[-1]["images"] == 16 * steps and recs[-1]["step"] == steps
    lines = [r for r in recs if "loss" in r and "event" not in r]
    assert len(lines) == steps
    for r in lines:
        assert set(STEP_KEYS) <= r.keys()
        assert all(math.isfinite(r[k]) for k in STEP_KEYS if k != "mse_by_t")
        assert r["mse_by_t"] and all(math.isfinite(v) for v in r["mse_by_t"].values())
        assert r["w_min"] <= r["w_max"]
    evals = [r for r in recs if r.get("event") == "eval"]
    if digits:
        want = {"fd_heun32"} if "diffusion" in name else {"fd_1step", "fd_2step"}
        assert len(evals) == 1 and want <= evals[0].keys()
        assert all(math.isfinite(evals[0][k]) and evals[0][k] >= 0 for k in want)
        assert want <= recs[-1].keys()
    else:
        assert not evals

    grids = sorted((run / "grids").glob("*.png"))
    assert [g.name for g in grids] == [f"grid-{16 * steps:012d}.png"]
    with Image.open(grids[0]) as im:
        # 64 samples, 8 per row, upscaled to 64 px: digits x8 with 4 px padding, 32 px images x2 with 1 px
        assert im.size == ((548, 548) if digits else (521, 521))
        assert im.mode == ("L" if digits else "RGB")


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTN_SMOKE)
@pytest.mark.parametrize("kind", ["sct", "diffusion"])
def test_smoke_run_attention_nets_bf16(tmp_path: Path, shard_root: Path, name: str, kind: str):
    """Attention U-Net and DiT specs train end to end under bf16 autocast, for both objectives."""
    assert (SPECS / f"{name}.py").is_file(), f"specs/{name}.py is missing: a smoke-tested spec was renamed or removed"
    run = tmp_path / "run"
    extra = ("--objective.kind", kind, "--train.precision", "bf16", "--net.unet.head_dim", "4", "--net.dit.depth", "2")
    res = run_cli("scm_graph.train", SPECS / f"{name}.py", *tiny_args(shard_root, run, 32, *extra), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ck = load_checkpoint(run / "ckpt.safetensors")
    spec = spec_from_json(ck.spec_json)
    assert (spec.net.arch, spec.objective.kind, spec.train.precision) == ("dit" if name == "digits_dit" else "unet", kind, "bf16")
    assert all(torch.isfinite(v).all() for v in ck.net.values())
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in step_records(run).values())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCD_SMOKE))
def test_smoke_run_distillation(tmp_path: Path, shard_root: Path, name: str):
    """The teacher spec trains; each sCD spec distils a tiny teacher of its own kind (3 steps, CLI in-process)."""
    digits = name.startswith("digits")
    extra = () if digits else ("--data.name", "cifar10", "--data.workers", "1")
    teacher = SCD_SMOKE[name]
    if teacher is None:  # the teacher spec itself: class-conditional diffusion with label dropout
        cli.main([str(SPECS / f"{name}.py"), *tiny_args(shard_root, tmp_path / "run", 48, *extra)])
        spec = spec_from_json(load_checkpoint(tmp_path / "run" / "ckpt.safetensors").spec_json)
        assert spec.net.class_conditional and spec.objective.kind == "diffusion" and spec.objective.label_dropout == 0.1
        return
    cli.main([str(SPECS / f"{teacher}.py"), *tiny_args(shard_root, tmp_path / "teacher", 16, *extra)])
    t_ckpt = tmp_path / "teacher" / "ckpt.safetensors"
    cli.main([str(SPECS / f"{name}.py"), *tiny_args(shard_root, tmp_path / "run", 48, *extra, "--objective.teacher", str(t_ckpt))])
    ck = load_checkpoint(tmp_path / "run" / "ckpt.safetensors")
    spec = spec_from_json(ck.spec_json)
    assert spec.objective.kind == "scd" and ck.step == 3 and spec.net.dropout == 0.0
    assert set(ck.net) == set(ck.ema) and not any("teacher" in k for k in ck.net)
    recs = step_records(tmp_path / "run")
    assert sorted(recs) == [1, 2, 3] and all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in recs.values())
    assert (len([r for r in read_metrics(tmp_path / "run") if r.get("event") == "eval"]) == 1) == digits


@pytest.mark.slow
def test_smoke_run_discrete_time_scm(tmp_path: Path, shard_root: Path):
    """digits_sct with `--objective.kind discrete --objective.N 40` (sCM Fig. 5c's discrete-time sCM) trains and samples."""
    run = tmp_path / "run"
    cli.main([str(SPECS / "digits_sct.py"), *tiny_args(shard_root, run, 32, "--objective.kind", "discrete", "--objective.N", "40")])
    ck = load_checkpoint(run / "ckpt.safetensors")
    spec = spec_from_json(ck.spec_json)
    assert (spec.objective.kind, spec.objective.N, ck.step) == ("discrete", 40, 2)
    recs = step_records(run)
    assert all(math.isfinite(r["loss"]) and r["tangent_norm"] > 0 and r["skipped"] == 0 for r in recs.values())
    assert {"fd_1step", "fd_2step"} <= read_metrics(run)[-1].keys()
