"""The shard CLI (`python -m scm_graph.shard`): a digits set end to end, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scm_graph.shard import main


def test_main_missing_src_is_one_line(tmp_path: Path, capsys):
    for argv in (["cifar10", "--out", str(tmp_path)], ["folder", "--src", str(tmp_path / "x"), "--resolution", "8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1


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
