"""remove_stale_temps: the orphaned `<name>.tmp-<pid>` files of a save killed before its rename go; the
temps of live writers and every file not named exactly like that stay, bytes untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import scm_graph.checkpoint as ckmod
from scm_graph.checkpoint import Checkpoint, load_checkpoint, remove_stale_temps, save_checkpoint
from scm_graph.spec import Spec, spec_to_json
from tests.helpers import REPO, cli_env


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    try:
        os.kill(p.pid, 0)
    except ProcessLookupError:
        return p.pid
    pytest.skip(f"pid {p.pid} was reused at once")


def _contents(folder: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in folder.iterdir():
        out[p.name] = f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return out


def test_removes_dead_writers_temps_only(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "ckpt.safetensors"
        path.write_bytes(b"the checkpoint")
        orphan = tmp_path / f"ckpt.safetensors.tmp-{dead}"
        orphan.write_bytes(b"x" * 4096)
        orphan.chmod(0o600)  # safetensors writes 0600: still removable
        keep = {
            f"ckpt.safetensors.tmp-{os.getpid()}": b"ours, being written",
            f"ckpt.safetensors.tmp-{live.pid}": b"a live writer's",
            "ckpt.safetensors.tmp-abc": b"not a pid",
            "other.tmp-1": b"another name",
            f"other.safetensors.tmp-{dead}": b"another checkpoint's temp",
            f"xckpt.safetensors.tmp-{dead}": b"longer name",
            f"ckpt.safetensors.tmp-{dead}.bak": b"suffix",
            f"ckpt.safetensors.tmp-0{dead}": b"not how a pid is written",
            "ckpt.safetensors.tmp-": b"no pid",
            f"ckpt_safetensors.tmp-{dead}": b"dot is literal",
            f"ckpt.safetensors.tmp{dead}": b"no dash",
        }
        for name, data in keep.items():
            (tmp_path / name).write_bytes(data)
        (tmp_path / "precious").write_bytes(b"precious")
        (tmp_path / f"ckpt.safetensors.tmp-{dead + 1000000}").mkdir()  # a folder is never removed
        os.symlink(tmp_path / "precious", tmp_path / f"ckpt.safetensors.tmp-{dead + 2000000}")  # nor a link
        before = _contents(tmp_path)
        del before[orphan.name]

        assert remove_stale_temps(path) == [orphan]
        assert not orphan.exists()
        assert _contents(tmp_path) == before
        assert remove_stale_temps(path) == []  # nothing left to do
    finally:
        live.kill()
        live.wait()


def test_pid_that_may_not_be_signalled_counts_as_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck[1].safetensors"  # regex characters in the name are literal
    for pid in (111, 222):
        (tmp_path / f"{path.name}.tmp-{pid}").write_bytes(b"t")
    (tmp_path / "ck1.safetensors.tmp-222").write_bytes(b"t")

    def kill(pid: int, sig: int) -> None:
        assert sig == 0
        raise PermissionError if pid == 111 else ProcessLookupError

    monkeypatch.setattr(ckmod.os, "kill", kill)
    assert remove_stale_temps(path) == [tmp_path / "ck[1].safetensors.tmp-222"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck1.safetensors.tmp-222", "ck[1].safetensors.tmp-111"]


def test_missing_folder(tmp_path: Path) -> None:
    assert remove_stale_temps(tmp_path / "nowhere" / "ckpt.safetensors") == []


def test_temp_of_a_save_killed_before_its_rename(tmp_path: Path) -> None:
    """A real save killed with SIGKILL between write and rename leaves its temp; it is removed, the previous
    checkpoint is untouched."""
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(spec_to_json(Spec()), 1, 16, {"w": torch.zeros(3)}))
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch
        import scm_graph.checkpoint as ck
        from scm_graph.spec import Spec, spec_to_json
        ck.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        ck.save_checkpoint({str(path)!r}, ck.Checkpoint(spec_to_json(Spec()), 2, 32, {{"w": torch.ones(3)}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr
    (orphan,) = [p for p in tmp_path.iterdir() if p.name != path.name]
    assert orphan.name == f"ckpt.safetensors.tmp-{orphan.name.rsplit('-', 1)[1]}"
    assert remove_stale_temps(path) == [orphan]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == before and load_checkpoint(path).step == 1
