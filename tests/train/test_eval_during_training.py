"""Evaluation during training: the spec's metrics every eval_every_images, logged to metrics.jsonl and kept in
checkpoint metadata; train.keep_best keeps the lowest-scoring state as best.safetensors; bad eval settings stop
the run at its start with one line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scm_graph.checkpoint import load_checkpoint, read_metadata
from scm_graph.eval.evaluator import evaluate
from scm_graph.sample.generate import load_generator
from tests.helpers import (
    assert_user_error,
    read_metrics,
    run_cli,
    tiny_args,
    train_main,
)

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")

EVERY = ("--train.eval_every_images", "32", "--train.eval_samples", "48", "--train.ckpt_every_images", "32")


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, shard_root: Path) -> Path:
    run = tmp_path_factory.mktemp("best") / "run"
    torch.manual_seed(0)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 128, *EVERY, "--train.keep_best", "fd_2step",
                                           "--optim.lr", "0.01"))
    return run


def test_evals_are_logged_and_in_checkpoint_metadata(best_run: Path):
    evals = [r for r in read_metrics(best_run) if r.get("event") == "eval"]
    assert [e["images"] for e in evals] == [32, 64, 96, 128]
    assert all(set(e) == {"event", "images", "fd_1step", "fd_2step"} for e in evals)
    ck = load_checkpoint(best_run / "ckpt.safetensors")
    # the final checkpoint was written before its evaluation: it carries the one before (images 96)
    assert ck.meta["eval"] == {k: v for k, v in evals[-2].items() if k != "event"}
    end = [r for r in read_metrics(best_run) if r.get("event") == "end"][-1]
    assert (end["fd_1step"], end["fd_2step"]) == (evals[-1]["fd_1step"], evals[-1]["fd_2step"])


def test_best_checkpoint_holds_the_lowest_evaluation_and_its_weights(best_run: Path):
    evals = [r for r in read_metrics(best_run) if r.get("event") == "eval"]
    best = min(evals, key=lambda e: e["fd_2step"])
    meta = json.loads(read_metadata(best_run / "best.safetensors")["meta"])
    assert meta["best"] == {"key": "fd_2step", "samples": 48, "ref": "", "t_mid": 1.1, "value": best["fd_2step"],
                            "images": best["images"]}
    assert meta["eval"] == {k: v for k, v in best.items() if k != "event"}
    ck = load_checkpoint(best_run / "best.safetensors")
    assert ck.images == best["images"]
    # its EMA scores what was logged (the same 48 samples, seed 0)
    row = evaluate(load_generator(best_run / "best.safetensors"), [2], 48)[0]
    assert row.fd == pytest.approx(best["fd_2step"], rel=1e-9)
    if best["images"] != evals[-1]["images"]:  # a later, worse evaluation did not replace it
        assert ck.images < load_checkpoint(best_run / "ckpt.safetensors").images


def test_resume_keeps_the_best_and_compares_against_it(best_run: Path, shard_root: Path, tmp_path: Path):
    before = json.loads(read_metadata(best_run / "best.safetensors")["meta"])["best"]
    run = tmp_path / "run"
    shutil.copytree(best_run, run)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 160, *EVERY, "--train.keep_best", "fd_2step",
                                           "--optim.lr", "0.01"), "--resume")
    evals = [r for r in read_metrics(run) if r.get("event") == "eval"]
    assert [e["images"] for e in evals] == [32, 64, 96, 128, 160]
    after = json.loads(read_metadata(run / "best.safetensors")["meta"])["best"]
    best = min(evals, key=lambda e: e["fd_2step"])
    assert after == {"key": "fd_2step", "samples": 48, "ref": "", "t_mid": 1.1, "value": best["fd_2step"],
                     "images": best["images"]}
    assert after == before if evals[-1]["fd_2step"] >= before["value"] else after["images"] == 160


def test_a_best_measured_another_way_is_replaced(best_run: Path, shard_root: Path, tmp_path: Path):
    """Resumed with another sample count, the old best is not comparable: the first new evaluation replaces it."""
    run = tmp_path / "run"
    shutil.copytree(best_run, run)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 160, *EVERY, "--train.keep_best", "fd_2step",
                                           "--optim.lr", "0.01", "--train.eval_samples", "40"), "--resume")
    after = json.loads(read_metadata(run / "best.safetensors")["meta"])["best"]
    assert (after["images"], after["samples"]) == (160, 40)


def test_resumed_with_another_eval_t_mid(best_run: Path, shard_root: Path, tmp_path: Path):
    """train.eval_t_mid may change on --resume: the grid and the evaluation after it sample 2 steps at
    [t_max, eval_t_mid], and a 2-step best measured at the old t_mid is not comparable, so it is replaced."""
    from scm_graph.sample.generate import generate, to_images
    from scm_graph.sample.grid import save_grid

    run = tmp_path / "run"
    shutil.copytree(best_run, run)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 160, *EVERY, "--train.keep_best", "fd_2step",
                                           "--optim.lr", "0.01", "--train.eval_t_mid", "0.8"), "--resume")
    after = json.loads(read_metadata(run / "best.safetensors")["meta"])["best"]
    assert (after["images"], after["t_mid"]) == (160, 0.8)
    g = load_generator(run / "ckpt.safetensors")  # the EMA at 160 images, which the grid and the evaluation used
    assert g.t_mid == 0.8
    last = [r for r in read_metrics(run) if r.get("event") == "eval"][-1]
    assert last["images"] == 160 and last["fd_2step"] == pytest.approx(evaluate(g, [2], 48, t_mid=0.8)[0].fd, rel=1e-9)
    assert last["fd_2step"] != pytest.approx(evaluate(g, [2], 48, t_mid=1.1)[0].fd, rel=1e-6)
    save_grid(to_images(g, generate(g, 64, times=[math.atan(80 / g.sigma_d), 0.8], seed=0)),
              tmp_path / "want.png")
    assert (run / "grids" / "grid-000000000160.png").read_bytes() == (tmp_path / "want.png").read_bytes()


def test_a_fresh_run_sets_a_leftover_best_aside(best_run: Path, shard_root: Path, tmp_path: Path, capsys):
    """A folder with best.safetensors but no checkpoint (an attempt killed before its first checkpoint): a fresh
    run moves the best aside, so best.safetensors never holds another run's weights; a dead save's temp goes."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(best_run / "best.safetensors", run / "best.safetensors")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)
    (run / f"best.safetensors.tmp-{dead}").write_bytes(b"partial")
    train_main("digits_sct.py", *tiny_args(shard_root, run, 32, "--train.keep_best", "fd_2step", "--train.seed", "3"))
    assert "moved to" in capsys.readouterr().err
    assert (run / "best.safetensors.stale").is_file() and not (run / f"best.safetensors.tmp-{dead}").exists()
    assert load_checkpoint(run / "best.safetensors").images == 32  # this run's own, at its only evaluation


@pytest.mark.parametrize("extra,needles", [
    (("--train.keep_best", "fid_2step"), ("train.keep_best 'fid_2step'", "fd_1step, fd_2step")),
    (("--train.eval_metrics", "fid"), ("train.eval_ref",)),
    (("--train.eval_metrics", "fd_dinov2", "--train.eval_ref", "x.npz"), ("DINOv2", "--train.eval_dinov2")),
    (("--train.eval_metrics", "fid", "--train.eval_ref", "x.npz", "--train.eval_inception", "NOWHERE"), ("inception-2015-12-05.pt", "download")),
    (("--train.eval_metrics", "fd_digits", "fd_digits"), ("listed twice",)),
])
def test_bad_eval_settings_stop_the_run_before_it_starts(tmp_path: Path, shard_root: Path, extra, needles):
    run = tmp_path / "run"
    res = run_cli("scm_graph.train", "specs/digits_sct.py", *tiny_args(shard_root, run, 16, *extra))
    assert_user_error(res, *needles)
    assert not run.exists()  # nothing was written


def test_fd_digits_on_a_non_digits_run_is_one_line(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    res = run_cli("scm_graph.train", "specs/digits_sct.py", *tiny_args(shard_root, run, 16, "--data.name", "cifar10",
                                                                         "--train.eval_metrics", "fd_digits"))
    assert_user_error(res, "fd_digits", "8x8 digits")
