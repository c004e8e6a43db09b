"""`just bench cold`: each run a child process on empty compile caches, the phases read from Dynamo's compile times."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from scm_graph.bench import cold
from tests.helpers import SPECS, assert_user_error, one_line_error, run_cli, table_body


def table_rows(out: str) -> list[list[str]]:
    return table_body(out, "| run | step |")


def test_phases_from_compile_times():
    names = ["_compile.compile_inner", "OutputGraph.call_user_compiler", "compile_fx.<locals>.fw_compiler_base",
             "compile_fx.<locals>.bw_compiler", "Scheduler.codegen", "async_compile.wait", "something_else"]
    values = ["50.0", "44.0", "30.0", "12.5", "20.0", "9.0", "1.0"]
    assert cold.phases_from(names, values) == cold.Phases(6.0, 14.0, 30.0, 12.5, 20.0, 9.0)
    p = cold.phases_from(names[:3], values[:3])  # no backward compiled, no code generation timed
    assert p == cold.Phases(dynamo_s=6.0, aot_s=14.0, inductor_fw_s=30.0)
    assert p.rest(60.0) is None and cold.Phases(5.0, 10.0, 40.0, 20.0).rest(78.0) == 3.0


def test_cold_table_rows_rest_and_means():
    full = cold.Phases(5.0, 10.0, 40.0, 20.0, 25.0, 15.0)
    runs = [cold.ColdRun("sct", 78.0, 140.0, full, "avx512", "a CPU, 2 threads"),
            cold.ColdRun("diffusion", 43.0, 90.0, dataclasses.replace(full, inductor_bw_s=None), "avx512", "a CPU, 2 threads"),
            cold.ColdRun("sct", 82.0, 150.0, full, "scalar", "a CPU, 2 threads")]
    md = cold.cold_table(runs, "specs/digits_sct.py", 128, "fp32", new_machine=False)
    assert md.startswith("## `just bench cold` — specs/digits_sct.py, a CPU, 2 threads, fp32, batch 128")
    rows = table_rows(md)
    assert [r[:3] for r in rows] == [["1", "sct", "**78.0**"], ["2", "diffusion", "**43.0**"], ["3", "sct", "**82.0**"]]
    assert rows[0][9] == "3.0" and rows[2][9] == "7.0"  # the first step less the four phases
    assert rows[1][6] == "–" and rows[1][9] == "–"  # an untimed phase leaves the rest unknown too
    assert rows[2][11] == "scalar"
    assert "**sct**: first step 80.0 s, the mean of 2 (range 78.0-82.0 s)" in md
    assert "**diffusion**: first step 43.0 s, the mean of 1" in md
    assert "was already there" in md
    assert "built its precompiled C++ header" in cold.cold_table(runs, "s.py", 1, "fp32", new_machine=True)


ARGS = cold.ColdArgs("specs/digits_sct.py", "sct", 4, "fp32", 1, 1, 1, "cpu")


@pytest.fixture
def scratch(monkeypatch, tmp_path) -> list[Path]:
    """The cold runs' scratch folders, made under tmp_path so a test can see them go."""
    made: list[Path] = []

    def mkdtemp(prefix: str) -> str:
        made.append(tmp_path / f"{prefix}{len(made)}")
        made[-1].mkdir()
        return str(made[-1])

    monkeypatch.setattr(cold.tempfile, "mkdtemp", mkdtemp)
    return made


@pytest.mark.parametrize(("rc", "stdout", "stderr", "needle"), [
    (1, "", "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n", "failed (exit code 1): RuntimeError: boom"),
    (2, "", "error: --spec x.py: no such file\n", "failed (exit code 2): --spec x.py: no such file"),
    (-11, "", "", "failed (exit code -11): no output"),
    (0, "a warning, then nothing\n", "", "printed no result line, but: a warning, then nothing"),
    (0, '{"kind": "sct"}\n', "", "printed no result line"),
])
def test_a_failing_child_is_one_line_and_its_cache_folder_goes(monkeypatch, scratch, rc, stdout, stderr, needle):
    def child(cmd, env, timeout_s):
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(scratch[-1]))
        assert env["TRITON_CACHE_DIR"].startswith(str(scratch[-1]))
        assert json.loads(cmd[-1]) == dataclasses.asdict(ARGS)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)

    monkeypatch.setattr(cold, "_run_child", child)
    assert needle in one_line_error(cold.cold_run, ARGS, False, 60)
    assert not scratch[-1].exists()


def test_a_hung_child_is_one_line_and_its_cache_folder_goes(monkeypatch, scratch):
    def hung(cmd, env, timeout_s):
        assert "TMPDIR" in env and Path(env["TMPDIR"]).is_dir()  # --new-machine
        raise subprocess.TimeoutExpired(cmd, timeout_s)

    monkeypatch.setattr(cold, "_run_child", hung)
    assert "ran past --timeout 60 s" in one_line_error(cold.cold_run, ARGS, True, 60)
    assert not scratch[-1].exists()


@pytest.mark.parametrize("stop", ["timeout", "ctrl-c"])
def test_a_stopped_child_takes_its_own_children_along(tmp_path, stop):
    """Past the timeout, or on Ctrl-C (whose SIGINT a child in a session of its own does not get), the child's whole
    session goes, so no compiler it started still writes into the cache folder."""
    import os
    import signal
    import threading
    import time

    pid_file = tmp_path / "grandchild.pid"
    cmd = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    t0 = time.monotonic()
    if stop == "timeout":
        with pytest.raises(subprocess.TimeoutExpired):
            cold._run_child(cmd, dict(os.environ), 1.0)
    else:
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            cold._run_child(cmd, dict(os.environ), 30.0)
        timer.join()
    assert time.monotonic() - t0 < 20  # a surviving grandchild would hold the pipes open for its 60 s
    pid = int(pid_file.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child's own child {pid} outlived the timeout")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--runs", "0"], "--runs must be at least 1"),
    (["--kind", "scd"], "--kind scd needs an sCD spec"),
    (["--spec", "specs/nope.py"], "specs/nope.py"),
    (["--out", "table.txt"], "--out"),
])
def test_bad_arguments_are_one_line(argv, needle):
    assert needle in one_line_error(cold.main.__wrapped__, argv)


def test_the_command_line_reports_a_bad_argument_in_one_line():
    assert_user_error(run_cli("scm_graph.bench", "cold", "--kind", "nope"), "--kind")


@pytest.mark.slow
def test_a_cold_start_end_to_end(capsys, tmp_path):
    """A tiny U-Net's sCT step, one run: the child compiles from empty caches (Inductor generates code: a warm cache
    would skip that), the phases fit inside the first step, and the table is appended to --out."""
    text = (SPECS / "digits_sct.py").read_text()
    unet = "dropout=0.1, unet=UNetSpec(channels=32, channel_mult=(1, 2), num_blocks=2, norm_groups=8)"
    assert unet in text
    spec = tmp_path / "tiny_sct.py"
    spec.write_text(text.replace(unet, "dropout=0.0, unet=UNetSpec(channels=8, channel_mult=(1,), num_blocks=1, norm_groups=4)"))
    out = tmp_path / "cold.md"
    cold.main.__wrapped__(["--spec", str(spec), "--runs", "1", "--batch", "4", "--steps", "1", "--rounds", "1",
                           "--threads", "1", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    (row,) = table_rows(printed)
    first, dynamo, aot, fw, bw, codegen, wait, rest = (float(row[i].strip("*")) for i in (2, 3, 4, 5, 6, 7, 8, 9))
    assert row[1] == "sct" and codegen > 0 and min(dynamo, aot, fw, bw) > 0
    assert codegen + wait <= fw + bw + 0.1  # both happen inside Inductor's two graphs
    assert 0 <= rest < first / 2  # the phases do not overlap (a rest below 0 would count one twice)
    assert out.read_text() in printed + "\n"
