"""The training CLI (`python -m scm_graph.train`): bad input is one line and exit 2, and touches nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import scm_graph.train.cli as cli
from scm_graph.errors import UserError
from tests.helpers import SPECS, assert_user_error, run_cli, snapshot, tiny_args


def test_cli_missing_spec_file(tmp_path: Path):
    assert_user_error(run_cli("scm_graph.train", tmp_path / "nope.py", cwd=tmp_path), "spec file not found", "nope.py")


def test_cli_first_arg_must_be_spec(tmp_path: Path):
    with pytest.raises(UserError, match=r"^the first argument must be a spec file, got --train\.batch$"):
        cli.parse_args(["--train.batch", "4"])
    res = run_cli("scm_graph.train", "--train.batch", "4", cwd=tmp_path)
    assert_user_error(res, "first argument must be a spec file", "--train.batch")
    assert not (tmp_path / "runs").exists()


def test_cli_unknown_field(tmp_path: Path, shard_root: Path):
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, tmp_path / "run"),
                  "--net.chanels", "3", cwd=tmp_path)
    assert_user_error(res, "Unrecognized option", "--net.chanels")
    assert not (tmp_path / "run").exists()


def test_cli_ill_typed_override(tmp_path: Path, shard_root: Path):
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, tmp_path / "run"),
                  "--optim.lr", "fast", cwd=tmp_path)
    assert_user_error(res, "--optim.lr", "could not convert", "float", "'fast'")
    assert not (tmp_path / "run").exists()


def test_cli_missing_shard_dir(tmp_path: Path, shard_root: Path):
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, tmp_path / "run"),
                  "--data.name", "nope", cwd=tmp_path)
    assert_user_error(res, "shard set", "nope", "not found", "scm_graph.shard")
    assert not (tmp_path / "run").exists()


def test_cli_truncated_shard(tmp_path: Path, shard_root: Path):
    root = tmp_path / "shards"
    shutil.copytree(shard_root / "digits", root / "digits")
    tars = sorted((root / "digits").glob("*.tar"))
    data = tars[0].read_bytes()
    tars[0].write_bytes(data[: len(data) // 2])
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(root, tmp_path / "run"), cwd=tmp_path)
    assert_user_error(res, "shard file", tars[0].name, "truncated")
    assert not (tmp_path / "run" / "ckpt.safetensors").exists()


def test_cli_existing_run_without_resume(tmp_path: Path, shard_root: Path, sct_ckpt: Path):
    run = sct_ckpt.parent
    before = snapshot(run)
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, run, 128), cwd=tmp_path)
    assert_user_error(res, f"{run} already holds a run", "pass --resume")
    assert snapshot(run) == before  # ckpt bytes and mtime, metrics and grids untouched


def test_cli_resume_without_checkpoint(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, run), "--resume", cwd=tmp_path)
    assert_user_error(res, "--resume", f"no checkpoint {run / 'ckpt.safetensors'}")
    assert not run.exists()


@pytest.mark.parametrize("change,field", [
    (("--net.unet.channels", "16"), "net.unet.channels"),
    (("--objective.kind", "diffusion"), "objective.kind"),
    (("--optim.lr", "0.5"), "optim.lr"),
    (("--train.batch", "8"), "train.batch"),
])
def test_cli_resume_with_changed_field(tmp_path: Path, shard_root: Path, sct_ckpt: Path, change, field):
    run = sct_ckpt.parent
    before = snapshot(run)
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, run, 128, *change), "--resume",
                  cwd=tmp_path)
    line = assert_user_error(res, f"--resume: {field} differs from the checkpoint", str(run / "ckpt.safetensors"))
    assert line.replace("'", "").endswith(f" vs {change[1]})"), line  # (saved vs requested)
    assert snapshot(run) == before
