"""The run folder: trained state before optional work, leftovers of killed runs tidied, keep_last, the
folder checked before work, progress lines off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scm_graph.train.loop as tr
from scm_graph.checkpoint import load_checkpoint
from scm_graph.errors import UserError
from scm_graph.train.rundir import keep_copy
from tests.helpers import PROGRESS_LINE, SPECS, assert_user_error, read_metrics, run_cli, tiny_args, train_main

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")


def _dead_pid() -> int:
    """The id of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# ----------------------------------------------------------------------------- nothing optional loses the run


def test_failing_final_evaluation_keeps_the_trained_state_and_resume_finishes_it(tmp_path: Path, shard_root: Path,
                                                                                  monkeypatch, capsys):
    run = tmp_path / "run"
    real = tr.evaluate_metrics

    def broken(*a, **k):
        raise UserError("need at least 2 images")

    monkeypatch.setattr(tr, "evaluate_metrics", broken)
    with pytest.raises(SystemExit) as e:
        train_main("digits_sct.py", *tiny_args(shard_root, run, 32))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not PROGRESS_LINE.fullmatch(ln)]
    assert err == [f"error: need at least 2 images (the trained state at 32 images is saved in {run / 'ckpt.safetensors'}; "
                   "--resume finishes this work)"]
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert ck.images == 32 and ck.meta["due"] == {"grid": True, "eval": True}
    assert (run / "grids" / f"grid-{32:012d}.png").exists()  # the grid came before the evaluation
    assert not [r for r in read_metrics(run) if r.get("event") in ("eval", "end")]

    monkeypatch.setattr(tr, "evaluate_metrics", real)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 32), "--resume")
    recs = read_metrics(run)
    evals = [r for r in recs if r.get("event") == "eval"]
    ends = [r for r in recs if r.get("event") == "end"]
    assert [r["images"] for r in evals] == [32] and ends[-1]["fd_1step"] == evals[0]["fd_1step"]
    assert load_checkpoint(run / "ckpt.safetensors").images == 32  # nothing was trained again

    # and the same for a run that was uninterrupted: the same FD (the evaluation is a function of the EMA)
    ref = tmp_path / "ref"
    train_main("digits_sct.py", *tiny_args(shard_root, ref, 32))
    assert [r for r in read_metrics(ref) if r.get("event") == "eval"][0]["fd_1step"] == evals[0]["fd_1step"]

    # resuming a finished run again changes nothing
    before = (run / "metrics.jsonl").read_bytes()
    train_main("digits_sct.py", *tiny_args(shard_root, run, 32), "--resume")
    assert (run / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- leftovers of killed runs


def test_leftovers_of_killed_runs_are_removed_once_and_said(tmp_path: Path, shard_root: Path, capsys):
    run = tmp_path / "run"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 16))
    dead, live = _dead_pid(), os.getppid()
    junk = [run / f"ckpt.safetensors.tmp-{dead}", run / f".metrics.jsonl.tmp-{dead}", run / "grids" / f".grid-x.png.tmp-{dead}",
            run / "metrics.jsonl.stale-20261125-101010", run / "metrics.jsonl.stale-20261125-101011"]
    keep = [run / f"ckpt.safetensors.tmp-{live}", run / "ckpt.safetensors.tmp-abc", run / "notes.txt", run / f"other.tmp-{dead}"]
    for p in junk + keep:
        p.write_bytes(b"x" * 100)
    junk[0].chmod(0o600)
    capsys.readouterr()
    train_main("digits_sct.py", *tiny_args(shard_root, run, 32), "--resume")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if not PROGRESS_LINE.fullmatch(ln)]
    assert notes == [f"tidied {run}: removed 3 temp file(s) left by killed runs and 2 old stale log(s)"]
    assert not any(p.exists() for p in junk) and all(p.exists() for p in keep)
    capsys.readouterr()
    train_main("digits_sct.py", *tiny_args(shard_root, run, 48), "--resume")
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tidied")]  # said once


def test_a_fresh_start_keeps_one_stale_log(tmp_path: Path, shard_root: Path, capsys):
    """The log of an attempt that died before its first checkpoint is kept aside once, never piled up."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl.stale").write_text('{"attempt": "first"}\n')
    (run / "metrics.jsonl").write_text('{"attempt": "second"}\n')
    with pytest.raises(SystemExit):
        train_main("digits_sct.py", *tiny_args(shard_root, run, 16, "--optim.lr", "-1"))  # refused: touches nothing
    assert (run / "metrics.jsonl").read_text() == '{"attempt": "second"}\n'
    capsys.readouterr()
    train_main("digits_sct.py", *tiny_args(shard_root, run, 16))
    assert [ln for ln in capsys.readouterr().err.splitlines() if not PROGRESS_LINE.fullmatch(ln)] == [
        f"{run / 'metrics.jsonl'} of an attempt without a checkpoint was moved to {run / 'metrics.jsonl.stale'}"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl", "metrics.jsonl.stale"]
    assert (run / "metrics.jsonl.stale").read_text() == '{"attempt": "second"}\n'
    assert [r.get("event") for r in read_metrics(run)].count("start") == 1


# ----------------------------------------------------------------------------- keep_last


def test_keep_last_keeps_the_newest_checkpoints_and_never_more(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 80, "--train.ckpt_every_images", "16", "--train.keep_last", "3"))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == [f"ckpt-{i:012d}.safetensors" for i in (48, 64, 80)]
    newest = run / "checkpoints" / kept[-1]
    assert newest.read_bytes() == (run / "ckpt.safetensors").read_bytes()
    assert [load_checkpoint(run / "checkpoints" / k).images for k in kept] == [48, 64, 80]
    for k in kept[:-1]:  # each a real, different checkpoint
        assert not torch.equal(load_checkpoint(run / "checkpoints" / k).net["net.conv_out.weight"],
                               load_checkpoint(newest).net["net.conv_out.weight"])
    # a resumed run may lower keep_last: pruned to the new K; files that are not ours stay
    (run / "checkpoints" / "mine.safetensors").write_bytes(b"x")
    train_main("digits_sct.py", *tiny_args(shard_root, run, 96, "--train.ckpt_every_images", "16", "--train.keep_last", "2"),
               "--resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-000000000080.safetensors", "ckpt-000000000096.safetensors", "mine.safetensors"]


def test_keep_last_one_writes_no_copies(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 48, "--train.ckpt_every_images", "16"))
    assert not (run / "checkpoints").exists()


def test_keep_copy_replaces_a_kept_file_whole(tmp_path: Path):
    (tmp_path / "ckpt.safetensors").write_bytes(b"new")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-000000000016.safetensors").write_bytes(b"old")
    keep_copy(tmp_path, 16, 2)
    assert (tmp_path / "checkpoints" / "ckpt-000000000016.safetensors").read_bytes() == b"new"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


# ----------------------------------------------------------------------------- the run folder, checked first


def test_train_out_naming_a_file_is_one_line_and_touches_nothing(tmp_path: Path, shard_root: Path):
    f = tmp_path / "afile"
    f.write_text("mine")
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, f, 16))
    assert assert_user_error(res) == f"error: --train.out {f}: exists and is not a folder"
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_out_under_a_read_only_folder_is_one_line(tmp_path: Path, shard_root: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, ro / "run", 16))
    finally:
        ro.chmod(0o755)
    assert assert_user_error(res) == f"error: --train.out: cannot create folder {ro / 'run'}: Permission denied"


# ----------------------------------------------------------------------------- progress off a terminal


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, shard_root: Path):
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py",
                  *tiny_args(shard_root, tmp_path / "run", 64, "--train.progress_every_s", "1e-9"))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 4 and all(PROGRESS_LINE.fullmatch(ln) for ln in lines), lines  # one per step here
    assert [ln.split()[1] for ln in lines] == ["16/64", "32/64", "48/64", "64/64"]
    assert lines[0].startswith("digits_sct  16/64 img (25%)")
    quiet = run_cli("scm_graph.train", SPECS / "digits_sct.py",
                    *tiny_args(shard_root, tmp_path / "quiet", 64, "--train.progress", "off"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    default = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, tmp_path / "default", 64))
    assert [PROGRESS_LINE.fullmatch(ln) is not None for ln in default.stderr.splitlines()] == [True]  # the first step only


def test_a_bad_init_from_fails_before_the_run_folder_exists(tmp_path: Path, shard_root: Path):
    bad = tmp_path / "teacher.safetensors"
    bad.write_text("not a checkpoint")
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py",
                  *tiny_args(shard_root, tmp_path / "run", 16, "--train.init_from", str(bad)))
    assert assert_user_error(res).startswith(f"error: checkpoint {bad} is not a safetensors file")
    assert not (tmp_path / "run").exists()
