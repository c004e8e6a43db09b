"""`just bench step`: the table names the device and the precisions, one row per objective and precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.common import device_name
from tests.helpers import SPECS, table_body


def first_table(out: str) -> list[list[str]]:
    """The cells of the first markdown table's body rows (images/s per objective and precision)."""
    return table_body(out, "| objective |")


def test_bench_step_table_names_precision_and_device(capsys):
    bench_main(["step", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--modes", "eager",
                "--precision", "fp32", "bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    dev = device_name(torch.device("cpu"))
    assert f"Device: {dev}" in out and "precision (autocast): fp32, bf16" in out
    rows = first_table(out)
    assert [(r[0], r[1]) for r in rows] == [("sct", "fp32"), ("sct", "bf16"), ("diffusion", "fp32"), ("diffusion", "bf16")]


def test_bench_step_of_an_scd_spec_times_the_scd_step(capsys):
    """`just bench step --spec specs/digits_scd.py`: the sCD step (with a frozen teacher and the guidance input)
    beside the diffusion step, and their ratio."""
    bench_main(["step", "--spec", "specs/digits_scd.py", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--modes", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [r[0] for r in first_table(out)] == ["scd", "diffusion"], out
    assert "| consistency step | mode | precision | sCD step time / diffusion step time |" in out
    assert "| scd | eager | fp32 |" in out


def test_bench_step_times_both_gradient_passes_and_the_host_decision(capsys):
    """`--fused-pass on off --host-read`: a row per gradient pass, each one's ratio to diffusion, and a table of
    each step with its update decided on the device against on the host."""
    bench_main(["step", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--modes", "eager",
                "--fused-pass", "on", "off", "--host-read", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [r[0] for r in first_table(out)] == ["sct, fused pass on", "sct, fused pass off", "diffusion"]
    assert "| sct, fused pass on | eager | fp32 |" in out and "| sct, fused pass off | eager | fp32 |" in out
    reads = [ln for ln in out.splitlines() if ln.startswith("| ") and ln.endswith("% |")]
    assert [ln.split("|")[1].strip() for ln in reads] == ["sct, fused pass on", "sct, fused pass off", "diffusion"]


def spec_rows(out: str) -> list[list[str]]:
    """The body rows of `--all`'s table (one per spec and precision)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| spec | network |")) + 2
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[start:] if ln.startswith("|")]


def test_bench_step_of_several_specs_is_one_table_sharing_the_diffusion_step(capsys, tmp_path):
    """Several `--spec`s: one table, each spec's own step (sCT, sCD, diffusion) against the diffusion step of its
    network and optimiser, timed once and shared: two sCT specs on one network share it, the sCD spec (a class- and
    guidance-conditional network) and the diffusion spec (Adam) have their own; the diffusion spec's ratio is 1."""
    other = tmp_path / "other_sct.py"  # digits_sct with another time proposal: the same network and optimiser
    text = (SPECS / "digits_sct.py").read_text()
    assert 'name="digits_sct"' in text and "P_std=1.0" in text
    other.write_text(text.replace('name="digits_sct"', 'name="other_sct"').replace("P_std=1.0", "P_std=1.4"))
    specs = [str(SPECS / "digits_sct.py"), str(other), str(SPECS / "digits_scd.py"), str(SPECS / "digits_diffusion.py")]
    bench_main(["step", "--spec", *specs, "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--modes", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = spec_rows(out)
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [("digits_sct", "sct", "fp32", "4"), ("other_sct", "sct", "fp32", "4"),
                                                        ("digits_scd", "scd", "fp32", "4"), ("digits_diffusion", "diffusion", "fp32", "4")]
    assert rows[0][1].startswith("unet, 1x8x8, ") and rows[0][1].endswith(" M")
    timed = [ln.split() for ln in out.splitlines() if ln.startswith("  ") and " img/s " in ln]
    assert [(Path(t[0]).stem, t[1]) for t in timed] == [("digits_sct", "sct"), ("digits_sct", "diffusion"), ("other_sct", "sct"),
                                                       ("digits_scd", "scd"), ("digits_scd", "diffusion"), ("digits_diffusion", "diffusion")]
    ms = [float(t[-5]) for t in timed]  # ms/step of each timing, in order (printed to 0.01 ms)
    assert rows[3][7] == "1.00x" and rows[3][6] == "–" and rows[3][8] == "–"
    for r, step, diffusion in ((rows[0], ms[0], ms[1]), (rows[1], ms[2], ms[1]), (rows[2], ms[3], ms[4])):
        assert abs(float(r[7][:-1]) - step / diffusion) <= 0.011  # the table's ratio, from the unrounded times


def test_bench_step_all_lists_every_shipped_spec(capsys, monkeypatch):
    """`--all`: every spec file of specs/ (not the `_` helpers) has a row; those over --max-params are listed once, with
    the reason, and not timed, and one whose shape only its shards give says so in its row."""
    monkeypatch.chdir(SPECS.parent)
    bench_main(["step", "--all", "--max-params", "0.001", "--precision", "fp32", "bf16", "--modes", "eager", "--device", "cpu"])
    rows = spec_rows(capsys.readouterr().out)
    shipped = sorted(p.stem for p in SPECS.glob("*.py") if not p.name.startswith("_"))
    assert [r[0] for r in rows] == shipped  # one row per spec: not timed at any precision
    assert {r[3] for r in rows if r[0] != "my_images_sct"} == {"fp32, bf16"}
    by = {r[0]: r for r in rows}
    assert by["imagenet512_scd_xxl"][2] == "scd" and by["imagenet512_scd_xxl"][1].startswith("edm2 c448, 4x64x64, ")
    assert by["digits_sct"][5].startswith("not timed: 1.05 M parameters, over --max-params 0.001 M")
    assert "not timed: --spec specs/my_images_sct.py: set data.resolution" in by["my_images_sct"][5]


def test_bench_step_of_several_specs_goes_on_after_a_failed_step(capsys, monkeypatch):
    """A step that runs out of memory, or fails to compile, is named in its row with the mode and the error's first
    line; the modes timed before it keep their numbers, and the specs after it are still timed."""
    from scm_graph.bench import step_specs

    real = step_specs.time_step

    def fake(spec, kind, compile, *args, **kw):
        if compile and kind == "scd":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if compile:
            raise RuntimeError("make_ttgir failed\nthe rest of a long log")
        return real(spec, kind, compile, *args, **kw)

    monkeypatch.setattr(step_specs, "time_step", fake)
    specs = [str(SPECS / "digits_scd.py"), str(SPECS / "digits_sct.py")]
    bench_main(["step", "--spec", *specs, "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--modes", "eager", "compiled", "--device", "cpu"])
    rows = spec_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["digits_scd", "digits_sct"]
    for r in rows:
        assert float(r[5]) > 0 and r[7].endswith("x") and r[6] == "–" and r[8] == "–"  # eager kept, compiled failed
    assert rows[0][9] == "– (failed: compiled: out of memory at batch 4)"
    assert rows[1][9] == "– (failed: compiled: RuntimeError: make_ttgir failed)"


def test_bench_step_names_a_bad_spec_before_timing_any(tmp_path, capsys):
    """Several `--spec`s with one missing: one line naming it, exit code 2, before any step is timed."""
    with pytest.raises(SystemExit) as e:
        bench_main(["step", "--spec", str(SPECS / "digits_sct.py"), str(tmp_path / "nope.py"), "--modes", "eager", "--steps", "1",
                    "--warmup", "1", "--rounds", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.count("\n") == 1 and "nope.py" in err
    assert "img/s" not in out


@pytest.mark.parametrize("args, words", [
    (["--all", "--spec", "specs/digits_sct.py"], "give it or --spec, not both"),
    (["--spec", "specs/digits_sct.py", "specs/digits_dit.py", "--host-read"], "do not apply"),
    (["--all", "--fused-pass", "on", "off"], "do not apply"),
])
def test_bench_step_rejects_options_that_do_not_combine(capsys, monkeypatch, args, words):
    monkeypatch.chdir(SPECS.parent)
    with pytest.raises(SystemExit) as e:
        bench_main(["step", *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err


def test_bench_step_times_a_spec_given_twice_once(capsys):
    """The same spec under two spellings is one spec: its own table, not the every-spec one."""
    path = str(SPECS / "digits_sct.py")
    bench_main(["step", "--spec", path, str(SPECS / ".." / "specs" / "digits_sct.py"), "--batch", "4", "--steps", "1",
                "--warmup", "1", "--rounds", "1", "--modes", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| objective |" in out and "| spec | network |" not in out
