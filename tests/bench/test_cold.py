"""`just bench cold`: each run a child process on empty compile caches, the phases read from Dynamo's compile times."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scm_graph.bench import cold
from tests.helpers import SPECS, assert_user_error, one_line_error, run_cli


def table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| run | step |")) + 2
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_phases_from_compile_times():
    names = ["_compile.compile_inner", "OutputGraph.call_user_compiler", "compile_fx.<locals>.fw_compiler_base",
             "compile_fx.<locals>.bw_compiler", "Scheduler.codegen", "async_compile.wait", "something_else"]
    values = ["50.0", "44.0", "30.0", "12.5", "20.0", "9.0", "1.0"]
    p = cold.phases_from(names, values)
    assert p == {"dynamo_s": 6.0, "aot_s": 14.0, "inductor_fw_s": 30.0, "inductor_bw_s": 12.5, "codegen_s": 20.0,
                 "wait_s": 9.0}
    p = cold.phases_from(names[:3], values[:3])  # no backward compiled, no code generation timed
    assert p["inductor_bw_s"] is None and p["codegen_s"] is None and p["wait_s"] is None and p["aot_s"] == 14.0


def test_cold_table_rows_rest_and_means():
    full = {"dynamo_s": 5.0, "aot_s": 10.0, "inductor_fw_s": 40.0, "inductor_bw_s": 20.0, "codegen_s": 25.0, "wait_s": 15.0}
    runs = [cold.ColdRun("sct", 78.0, 140.0, full, "avx512"),
            cold.ColdRun("diffusion", 43.0, 90.0, dict(full, inductor_bw_s=None), "avx512"),
            cold.ColdRun("sct", 82.0, 150.0, full, "scalar")]
    md = cold.cold_table(runs, "specs/digits_sct.py", 128, "fp32", "a CPU, 2 threads", new_machine=False)
    rows = table_rows(md)
    assert [r[:3] for r in rows] == [["1", "sct", "**78.0**"], ["2", "diffusion", "**43.0**"], ["3", "sct", "**82.0**"]]
    assert rows[0][9] == "3.0" and rows[2][9] == "7.0"  # the first step less the four phases
    assert rows[1][6] == "–" and rows[1][9] == "–"  # an untimed phase leaves the rest unknown too
    assert rows[2][11] == "scalar"
    assert "**sct**: first step 80.0 s, the mean of 2 (range 78.0-82.0 s)" in md
    assert "**diffusion**: first step 43.0 s, the mean of 1" in md
    assert "was already there" in md
    assert "built its precompiled C++ header" in cold.cold_table(runs, "s.py", 1, "fp32", "d", new_machine=True)


ARGS = {"spec": "specs/digits_sct.py", "kind": "sct", "batch": 4, "precision": "fp32", "threads": 1, "steps": 1,
        "rounds": 1, "device": "cpu"}


def test_a_failing_child_is_one_line_and_its_cache_folder_goes(monkeypatch, tmp_path):
    made: list[Path] = []

    def mkdtemp(prefix: str) -> str:
        made.append(tmp_path / f"{prefix}{len(made)}")
        made[-1].mkdir()
        return str(made[-1])

    def failing(cmd, env, **kw):
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(made[-1])) and env["TRITON_CACHE_DIR"].startswith(str(made[-1]))
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n")

    monkeypatch.setattr(cold.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(cold.subprocess, "run", failing)
    msg = one_line_error(cold.cold_run, ARGS, False, 60)
    assert "failed: RuntimeError: boom" in msg and not made[-1].exists()

    def hanging(cmd, env, timeout, **kw):
        assert "TMPDIR" in env and Path(env["TMPDIR"]).is_dir()  # --new-machine
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(cold.subprocess, "run", hanging)
    assert "ran past --timeout 60 s" in one_line_error(cold.cold_run, ARGS, True, 60)
    assert not made[-1].exists()


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
    would skip that), the phases add up to the first step, and the table is appended to --out."""
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
    first, dynamo, aot, fw, bw, codegen, rest = (float(row[i].strip("*")) for i in (2, 3, 4, 5, 6, 7, 9))
    assert row[1] == "sct" and codegen > 0 and min(dynamo, aot, fw, bw) > 0
    assert abs(first - (dynamo + aot + fw + bw + rest)) < 0.25 and 0 <= rest < first / 2
    assert out.read_text() in printed + "\n"
