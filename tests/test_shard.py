"""The shard CLI (`python -m scm_graph.shard`): a digits set end to end, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scm_graph.shard import main
from tests.helpers import PROGRESS_LINE, assert_user_error, run_cli


def test_main_missing_src_is_one_line(tmp_path: Path, capsys):
    expected = ["error: the following arguments are required: --src", f"error: --src {tmp_path / 'x'} is not a folder"]
    for argv, line in zip((["cifar10", "--out", str(tmp_path)], ["folder", "--src", str(tmp_path / "x"), "--resolution", "8"]),
                          expected):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1
        assert err == line + "\n"


@pytest.mark.parametrize("argv,line", [
    (["folder", "--resolution", "8"], "error: the following arguments are required: --src"),
    (["folder", "--src", "."], "error: the following arguments are required: --resolution"),
    (["folder", "--src", ".", "--resolution", "0"], "error: --resolution must be positive, not 0"),
    (["digits", "--shard-size", "0"], "error: --shard-size must be positive, not 0"),
    (["digits", "--shard-size", "many"], "error: argument --shard-size: invalid int value: 'many'"),
    (["cifar10", "--src", "x", "--split", "val"], "error: argument --split: invalid choice: 'val' (choose from train, test)"),
    (["mnist"], "error: argument SOURCE: invalid choice: 'mnist' (choose from digits, cifar10, folder, imagenet)"),
    (["imagenet", "--src", "."], "error: the following arguments are required: --resolution"),
    (["imagenet", "--src", ".", "--resolution", "64", "--latent", "std"],
     "error: argument --latent: invalid choice: 'std' (choose from mean_std, mean)"),
    ([], "error: the following arguments are required: SOURCE"),
    (["digits", "--name", ".hidden"], "error: --name must be a plain folder name, not '.hidden'"),
])
def test_main_bad_arguments_say_what_is_wrong(tmp_path: Path, capsys, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path)] if argv else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    if "(choose from" in line:  # argparse quotes the choices in some Python versions and not in others
        for choice in ("digits", "cifar10", "folder", "imagenet", "mean_std", "mean"):
            err = err.replace(f"'{choice}'", choice)
        err = err.replace("'train'", "train").replace("'test'", "test")
    assert err == line + "\n"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_main_refuses_existing_set(tmp_path: Path, capsys):
    (tmp_path / "digits").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["digits", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'digits'} already exists; pass --force to replace it\n"


def test_cli_subprocess_digits(tmp_path: Path):
    ok = subprocess.run(
        [sys.executable, "-m", "scm_graph.shard", "digits", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "1797" in ok.stdout
    assert json.loads((tmp_path / "digits" / "manifest.json").read_text())["count"] == 1797


def test_cli_subprocess_bad_source_is_one_line(tmp_path: Path):
    bad = subprocess.run(
        [sys.executable, "-m", "scm_graph.shard", "cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert bad.returncode == 2 and lines[0] == f"error: --src {tmp_path / 'nope'} does not exist", bad.stderr


def _no_source(*args):
    raise AssertionError("the source was loaded before --out was checked")


def test_folder_cli_prints_one_skipped_line(tmp_path: Path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    for i, name in enumerate(("a.png", "b.gif", "c.tif")):
        Image.new("RGB", (9, 9), (i * 80, 200 - i * 50, 30 + i)).save(src / name)
    (src / "notes.txt").write_text("x")
    (src / "todo.txt").write_text("x")
    (src / ".DS_Store").write_bytes(b"x")
    main(["folder", "--src", str(src), "--resolution", "8", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 2, out
    assert [PROGRESS_LINE.fullmatch(ln) is not None for ln in out.err.splitlines()] == [True], out.err  # stderr is no terminal
    assert lines[0] == "skipped 3 files: 2 .txt, 1 hidden (.DS_Store, notes.txt, todo.txt)"
    assert lines[1].startswith("wrote 3 images 3x8x8 (no labels) in 1 shard(s)"), lines[1]


def test_out_is_an_existing_file(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr("scm_graph.shard._make_source", _no_source)
    (tmp_path / "shards").write_text("not a folder")
    for out, line in ((tmp_path / "shards", f"--out {tmp_path / 'shards'} is a file, not a folder"),
                      (tmp_path / "shards" / "sub", f"--out {tmp_path / 'shards' / 'sub'} cannot be created: "
                                                    f"{tmp_path / 'shards'} is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            main(["digits", "--out", str(out)])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: {line}\n"
    res = run_cli("scm_graph.shard", "digits", "--out", tmp_path / "shards")
    assert_user_error(res, f"--out {tmp_path / 'shards'} is a file, not a folder")


def test_out_under_a_read_only_folder(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr("scm_graph.shard._make_source", _no_source)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode bits; make the check see what a user would
        real = os.access
        monkeypatch.setattr("scm_graph.data.writer.os.access", lambda p, mode: real(p, mode) and Path(p) != ro)
    try:
        for out, line in ((ro / "shards" / "x", f"--out {ro / 'shards' / 'x'} cannot be created: {ro} is not writable"),
                          (ro, f"--out {ro} is not writable")):
            with pytest.raises(SystemExit) as e:
                main(["digits", "--out", str(out)])
            assert e.value.code == 2
            assert capsys.readouterr().err == f"error: {line}\n"
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_unfinished_copies_of_killed_writes_are_removed_once(tmp_path: Path, capsys):
    """A killed `shard` leaves `.<name>.tmp-<pid>-<hex>` (and, mid-swap, `.<name>.old-...`); the next write of that
    set removes those whose writer is gone, and nothing else."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    out = tmp_path / "shards"
    junk = [out / f".digits.tmp-{dead}-0123abcd", out / f".digits.old-{dead}-89abcdef"]
    keep = [out / f".digits.tmp-{os.getpid()}-0123abcd", out / f".other.tmp-{dead}-0123abcd", out / "mine"]
    for p in junk + keep:
        p.mkdir(parents=True)
        (p / "shard-000000.tar").write_bytes(b"x")
    main(["digits", "--out", str(out)])
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tidied")]
    assert said == [f"tidied {out}: removed 2 unfinished copy(ies) of digits left by killed writes"]
    assert not any(p.exists() for p in junk) and all(p.exists() for p in keep)


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_folder_jobs_below_one_is_one_line(tmp_path: Path, capsys, jobs: str, monkeypatch):
    monkeypatch.setattr("scm_graph.shard._make_source", _no_source)
    with pytest.raises(SystemExit) as e:
        main(["folder", "--src", str(tmp_path), "--resolution", "8", "--jobs", jobs, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: --jobs must be at least 1, not {jobs}\n"


def test_digits_splits_partition_the_digits(tmp_path: Path):
    """`shard digits --split train` and `--split heldout`: 1500 and 297 of the 1797 images under their own names,
    together every image once, each with its label (a fixed split: the same on every run)."""
    import numpy as np

    from scm_graph.data.digits import N_HELDOUT, load_digits_uint8, split_indices
    from scm_graph.data.stream import read_all
    from scm_graph.spec import DataSpec

    images, labels = load_digits_uint8()
    got = {}
    for split in ("train", "heldout"):
        main(["digits", "--split", split, "--out", str(tmp_path)])
        name = f"digits-{split}"
        assert json.loads((tmp_path / name / "manifest.json").read_text())["count"] == (N_HELDOUT if split == "heldout" else 1500)
        got[split] = list(read_all(DataSpec(name=name, root=str(tmp_path))))
    keys = [(x.tobytes(), y) for split in ("train", "heldout") for x, y in zip(*_arrays(got[split]))]
    assert sorted(keys) == sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))  # each image exactly once
    for split in ("train", "heldout"):
        x, y = _arrays(got[split])
        idx = split_indices(split)
        assert np.array_equal(x, images[idx]) and np.array_equal(y, labels[idx])  # in the original order
    assert np.array_equal(split_indices("heldout"), split_indices("heldout"))  # fixed
    assert len(np.intersect1d(split_indices("train"), split_indices("heldout"))) == 0


def _arrays(samples) -> tuple:
    """read_all's (uint8 CHW bytes, label) pairs as arrays [N, 1, 8, 8] and [N]."""
    import numpy as np

    xs, ys = zip(*samples)
    return np.stack([np.frombuffer(x, np.uint8).reshape(1, 8, 8) for x in xs]), np.asarray([int(y) for y in ys])
