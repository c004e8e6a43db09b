"""`python -m scm_graph.sweep`: sweep files read and checked, bad input one line and exit 2 before any training,
a real 2 x 2 digits sweep (one run resumed, a rerun skipping every finished run), and the statistics (mean ± std,
spikes, non-finite and skipped counts) against hand-computed values on synthetic metrics.jsonl files."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scm_graph.errors import UserError
from scm_graph.sweep import Sweep
from scm_graph.sweep import execute as execute_mod
from scm_graph.sweep.cli import main
from scm_graph.sweep.plots import curves
from scm_graph.sweep.state import run_state
from scm_graph.sweep.stats import count_spikes, mean_std, run_result, variant_rows
from scm_graph.sweep.sweepfile import plan, read_sweep_file
from scm_graph.sweep.table import fmt_stat
from tests.helpers import (
    REPO,
    SPECS,
    TINY_ARGS,
    TorchDefaults,
    assert_user_error,
    one_line_error,
    run_cli,
)

PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep(folder: Path, root: Path | None = None, name: str = "sw.py", **fields) -> Path:
    """A sweep file in `folder`: two digits sCT variants, seeds 0 and 1, a tiny eager run each (32 images)."""
    args = [*TINY_ARGS, "--train.progress", "off", *(["--data.root", str(root)] if root else [])]
    f = {"base": str(SPECS / "digits_sct.py"), "images": 32, "seeds": (0, 1), "args": args,
         "variants": {"a": [], "b": ["--objective.P_mean", "-0.4"]}, "out": str(folder / "out"), **fields}
    body = ", ".join(f"{k}={v!r}" for k, v in f.items())
    path = folder / name
    path.write_text(f"from scm_graph.sweep import Sweep\n\nSWEEP = Sweep({body})\n")
    return path


def exit_line(capsys, *argv: str) -> str:
    """main(argv) exits 2 with exactly one stderr line `error: ...`; returns it."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (e.value.code, err)
    return err[0]


# ---------------------------------------------------------------------------------------------
# The sweep file


def test_read_sweep_file_and_plan(tmp_path: Path):
    path = write_sweep(tmp_path, variants={"a": [], "d": ["specs/digits_diffusion.py", "--optim.lr", "2e-3"]}, out="")
    s = read_sweep_file(path)
    assert isinstance(s, Sweep) and s.images == 32 and tuple(s.seeds) == (0, 1)
    runs = plan(s, Path("o"))
    assert [r.name for r in runs] == ["a-s0", "d-s0", "a-s1", "d-s1"]  # seed by seed
    d = runs[1]
    assert d.spec_file == "specs/digits_diffusion.py" and d.overrides[-2:] == ("--optim.lr", "2e-3")
    assert runs[0].spec_file == str(SPECS / "digits_sct.py")
    argv = d.argv(resume=True)
    assert argv[0] == "specs/digits_diffusion.py" and argv[-7:] == [
        "--train.total_images", "32", "--train.seed", "0", "--train.out", str(Path("o") / "d-s0"), "--resume"]
    assert [r.name for r in plan(s, Path("o"), only=["d"])] == ["d-s0", "d-s1"]
    with pytest.raises(UserError, match=r"^--only: no variant 'x' in the sweep \(it has: a, d\)$"):
        plan(s, Path("o"), only=["x"])


@pytest.mark.parametrize("fields,needle", [
    ({"images": 0}, "images must be a positive integer"),
    ({"seeds": ()}, "seeds must be distinct integers"),
    ({"seeds": (1, 1)}, "seeds must be distinct integers"),
    ({"variants": {}}, "variants must be a dict"),
    ({"variants": {"a/b": []}}, "variant name 'a/b'"),
    ({"variants": {"a": "--optim.lr 1"}}, "variant a: its arguments must be a list of strings"),
    ({"variants": {"a": ["--train.seed", "3"]}}, "variant a sets --train.seed; the sweep sets it"),
    ({"variants": {"a": ["--train.total-images=5"]}}, "variant a sets --train.total_images"),
    ({"variants": {"a": ["--resume"]}}, "--resume is not allowed"),
    ({"args": ["--train.out", "x"]}, "args sets --train.out"),
])
def test_bad_sweep_file_is_one_line(tmp_path: Path, capsys, fields: dict, needle: str):
    line = exit_line(capsys, str(write_sweep(tmp_path, **fields)))
    assert needle in line and "sw.py" in line, line
    assert not (tmp_path / "out").exists()


def test_unloadable_sweep_files(tmp_path: Path, capsys):
    assert "sweep file not found" in exit_line(capsys, str(tmp_path / "nope.py"))
    (tmp_path / "syntax.py").write_text("SWEEP = Sweep(\n")
    assert "failed to load: SyntaxError" in exit_line(capsys, str(tmp_path / "syntax.py"))
    (tmp_path / "none.py").write_text("SPEC = 1\n")
    assert "must define SWEEP = Sweep(...)" in exit_line(capsys, str(tmp_path / "none.py"))


def test_example_sweep_file_loads():
    s = read_sweep_file(REPO / "specs" / "sweeps" / "example.py")
    assert s.base == "specs/digits_sct.py" and len(s.variants) >= 2


# ---------------------------------------------------------------------------------------------
# Checked before any training


def test_dry_run_lists_runs(tmp_path: Path, shard_root: Path, capsys):
    main([str(write_sweep(tmp_path, shard_root)), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out[:4]] == ["a-s0", "b-s0", "a-s1", "b-s1"]
    assert all(": new: python -m scm_graph.train " in ln for ln in out[:4])
    assert "--objective.P_mean -0.4 --train.total_images 32 --train.seed 0" in out[1]
    assert out[4] == "4 runs, 4 to train; nothing was run (--dry-run)"
    assert not (tmp_path / "out").exists()


def test_rejected_override_stops_before_training(tmp_path: Path, shard_root: Path, capsys):
    """Variant b's override is rejected by the train CLI's own parser before variant a trains (the real command)."""
    path = write_sweep(tmp_path, shard_root, variants={"a": [], "b": ["--optim.lr", "fast"]})
    res = run_cli("scm_graph.sweep", path, cwd=tmp_path)
    line = assert_user_error(res, "error: b-s0: ", "--optim.lr", "could not convert", "'fast'")
    assert line.startswith("error: b-s0: ") and res.stdout == ""
    assert not (tmp_path / "out").exists()
    assert "variant 'c'" in exit_line(capsys, str(path), "--only", "c")


def test_bad_sweep_file_exits_2_from_the_command_line(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "scm_graph.sweep", str(write_sweep(tmp_path, images=-1))],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "images must be a positive integer" in res.stderr


# ---------------------------------------------------------------------------------------------
# A real sweep: 2 variants x 2 seeds of 2 eager steps


def test_tiny_sweep_resume_and_rerun(tmp_path: Path, shard_root: Path, scm_cache: Path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_sweep(tmp_path, shard_root)
    out = tmp_path / "out"
    # by the sweep's own commands, in-process (quicker): a-s1 killed after its first checkpoint, at 16 of its 32
    # images; b-s1 finished
    pre = {r.name: r for r in plan(read_sweep_file(path), out) if r.name in ("a-s1", "b-s1")}
    from scm_graph.train.cli import main as train_main

    with TorchDefaults():
        train_main(dataclasses.replace(pre["a-s1"], images=16).argv(resume=False))
        train_main(pre["b-s1"].argv(resume=False))
    a1 = pre["a-s1"]
    assert [run_state(r.folder, 32).status for r in pre.values()] == ["resume", "done"]
    capfd.readouterr()

    main([str(path)])
    lines = capfd.readouterr().out.splitlines()
    sweep_lines = [ln for ln in lines if ln.startswith("[")]
    assert [ln.split(":")[0] for ln in sweep_lines] == [
        "[1/4] a-s0", "[1/4] a-s0", "[2/4] b-s0", "[2/4] b-s0", "[3/4] a-s1", "[3/4] a-s1", "[4/4] b-s1"]
    assert "resuming at 16 images" in sweep_lines[4] and sweep_lines[4].endswith("--resume")
    assert sum("done in" in ln for ln in sweep_lines) == 3 and sweep_lines[6].endswith("finished (32 images), skipped")
    a1_log = [json.loads(ln) for ln in (a1.folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in a1_log if "loss" in r and "event" not in r] == [16, 32]  # continued, not restarted
    assert sum(r.get("event") == "start" for r in a1_log) == 1

    md = (out / "sweep.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if re.match(r"\| [ab] \|", ln)}
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "0, 1" and " ± " in cells[2] and " ± " in cells[3]  # fd_1step, fd_2step over two seeds
    assert "| variant | seeds | fd_1step | fd_2step | wall s |" in md and "Image budget: 32 training images" in md
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["fd_1step.png", "fd_2step.png", "grad_norm.png", "loss.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == PNG and f"(plots/{p})" in md for p in pngs)

    # rerun: every run finished, nothing trains again
    ckpts = {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt.safetensors")}
    logs = {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")}
    main([str(path)])
    lines = capfd.readouterr().out.splitlines()
    assert sum(ln.endswith("finished (32 images), skipped") for ln in lines) == 4 and not any("starting" in ln for ln in lines)
    assert ckpts == {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt.safetensors")} and len(ckpts) == 4
    assert logs == {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")}


def test_failed_run_does_not_stop_the_sweep(tmp_path: Path, monkeypatch, capsys):
    """A run that fails is reported and the next one starts; a run stopped by Ctrl-C (exit 130) stops the sweep."""
    runs = plan(read_sweep_file(write_sweep(tmp_path)), tmp_path / "out")
    states = [run_state(r.folder, r.images) for r in runs]
    codes = {"a-s0": 0, "b-s0": 3, "a-s1": 0, "b-s1": 130}
    monkeypatch.setattr(execute_mod, "command", lambda run, state: [sys.executable, "-c", f"raise SystemExit({codes[run.name]})"])
    assert execute_mod.execute(runs[:3], states[:3]) == [execute_mod.Failure("b-s0", 3)]
    out = capsys.readouterr().out.splitlines()
    assert out[3] == "[2/3] b-s0: failed (exit 3) after 0 s; going on with the next run" and out[5] == "[3/3] a-s1: done in 0 s"
    with pytest.raises(KeyboardInterrupt):
        execute_mod.execute(runs, states)


# ---------------------------------------------------------------------------------------------
# Statistics on synthetic logs


def test_count_spikes_by_hand():
    # 7 > 5 x median(1, 1.2) = 5.5; 30 > 5 x median(1, 1.1, 1.2, 7) = 5.75; the null is skipped; 2 < 5 x 1.2
    assert count_spikes([1, 1.2, 7, 1.1, 30, None, 2]) == 2
    assert count_spikes([2, 10]) == 0 and count_spikes([2, 10.01]) == 1  # more than 5x, strictly
    assert count_spikes([]) == count_spikes([5]) == count_spikes([None, 100]) == 0
    # the adaptive-weighted loss is negative: a spike rises more than 4 |median| above it
    assert count_spikes([-3, -3.2, 10, -3.1]) == 1  # 10 - (-3.1) = 13.1 > 12.4
    assert count_spikes([-3, 9]) == 0  # 12 = 4 x 3, not more
    assert count_spikes([1.0, math.nan, math.inf, 1.0]) == 0  # non-finite values are not judged


def test_mean_std_and_format():
    s = mean_std([2.0, 4.0])
    assert s.mean == 3 and s.std == pytest.approx(math.sqrt(2)) and s.n == 2  # sqrt(((2-3)^2 + (4-3)^2) / 1)
    s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.std == pytest.approx(math.sqrt(5 / 3))  # (2.25 + 0.25 + 0.25 + 2.25) / 3
    assert mean_std([7.0]).std is None
    assert fmt_stat(mean_std([4.7, 4.9])) == "4.80 ± 0.14" and fmt_stat(mean_std([7.0])) == "7"
    assert fmt_stat(mean_std([812.0, 840.0])) == "826 ± 20" and fmt_stat(None) == "–"


def write_log(folder: Path, lines: list[dict], evals: list[dict], end: int | None) -> None:
    """A synthetic metrics.jsonl: start event, metrics lines (images 100, 200, ...), eval events, optional end."""
    folder.mkdir(parents=True)
    recs = [{"event": "start", "images": 0, "spec": {"name": "digits_sct"}}]
    for i, ln in enumerate(lines):
        recs.append({"images": 100 * (i + 1), "step": i + 1, "nonfinite": 0, "skipped": 0, "wall_s": 10.0 * (i + 1), **ln})
        recs += [{"event": "eval", **e} for e in evals if e["images"] == 100 * (i + 1)]
    if end is not None:
        recs.append({"event": "end", "images": end, "wall_s": 10.0 * len(lines)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"images": 9')  # torn last line


def synthetic_sweep(tmp_path: Path) -> tuple[Path, Path]:
    """Variant a: two finished seeds; variant b: seed 0 finished, seed 1 stopped half way with non-finite values."""
    out = tmp_path / "out"
    write_log(out / "a-s0", [{"loss": 1.0, "grad_norm": 1.0}, {"loss": 6.0, "grad_norm": 1.2, "nonfinite": 3},
                             {"loss": 0.9, "grad_norm": 7.0, "skipped": 1}, {"loss": 0.8, "grad_norm": 1.0}],
              [{"images": 200, "fd_1step": 9.0}, {"images": 400, "fd_1step": 4.0, "fd_2step": 3.0}], end=400)
    write_log(out / "a-s1", [{"loss": 1.0, "grad_norm": 1.0}] * 4,
              [{"images": 200, "fd_1step": 8.0}, {"images": 400, "fd_1step": 6.0, "fd_2step": 2.0}], end=400)
    write_log(out / "b-s0", [{"loss": -3.0, "grad_norm": 2.0}, {"loss": -3.2, "grad_norm": 2.0},
                             {"loss": 10.0, "grad_norm": 2.0}, {"loss": -3.1, "grad_norm": 2.0}],
              [{"images": 400, "fd_1step": 5.0, "fd_2step": 4.0}], end=400)
    write_log(out / "b-s1", [{"loss": 1.0, "grad_norm": 1.0, "nonfinite": 5, "skipped": 2},
                             {"loss": None, "grad_norm": None, "nonfinite": 16, "skipped": 1}],
              [{"images": 200, "fd_1step": 50.0}], end=None)
    path = write_sweep(tmp_path, images=400, variants={"a": [], "b": [], "c": []}, out=str(out))
    return path, out


def test_statistics_on_synthetic_logs(tmp_path: Path):
    path, out = synthetic_sweep(tmp_path)
    runs = plan(read_sweep_file(path), out)
    res = {r.name: run_result(r, run_state(r.folder, r.images)) for r in runs}
    a0, b1, c0 = res["a-s0"], res["b-s1"], res["c-s0"]
    assert (a0.status, a0.images, a0.wall_s) == ("done", 400, 40.0)
    assert a0.evals == {"fd_1step": 4.0, "fd_2step": 3.0}  # the last evaluation
    assert (a0.loss_spikes, a0.grad_spikes, a0.nonfinite, a0.skipped) == (1, 1, 3, 1)  # 6 > 5 x 1; 7 > 5 x 1.1
    assert (res["b-s0"].loss_spikes, res["b-s0"].grad_spikes) == (1, 0)
    assert (b1.status, b1.images, b1.nonfinite, b1.skipped, b1.evals) == ("stopped", 200, 21, 3, {"fd_1step": 50.0})
    assert (c0.status, c0.images, c0.evals) == ("not started", 0, {})

    rows = {r.variant: r for r in variant_rows(list(res.values()))}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a.done == (0, 1) and a.evals["fd_1step"].mean == 5.0 and a.evals["fd_1step"].std == pytest.approx(math.sqrt(2))
    assert a.evals["fd_2step"].mean == 2.5 and a.evals["fd_2step"].std == pytest.approx(math.sqrt(0.5))
    assert a.wall_s is not None and (a.wall_s.mean, a.wall_s.std) == (40.0, 0.0)
    assert b.done == (0,) and b.evals["fd_1step"].mean == 5.0 and b.evals["fd_1step"].std is None  # the stopped seed is left out
    assert (b.loss_spikes, b.nonfinite, b.skipped) == (1, 21, 3)  # ... but its counts are not
    assert c.done == () and c.evals == {} and c.wall_s is None

    fd = {cv.variant: cv for cv in curves(list(res.values()), "fd_1step", "eval")}
    assert set(fd) == {"a", "b"}
    assert fd["a"].mean == ([200, 400], [8.5, 5.0])  # (9 + 8) / 2, (4 + 6) / 2
    assert fd["b"].mean == ([200, 400], [50.0, 5.0])  # one seed at each count


def test_report_only_is_torch_free(tmp_path: Path):
    path, out = synthetic_sweep(tmp_path)
    code = ("import sys; from scm_graph.sweep.cli import main; main([sys.argv[1], '--report-only']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    md = (out / "sweep.md").read_text()
    assert "| a | 0, 1 | 5.0 ± 1.4 | 2.50 ± 0.71 | 40 ± 0 | 1 | 1 | 3 | 1 |" in md, md
    assert "| b | 0 (of 0, 1) | 5 | 4 | 40 | 1 | 0 | 21 | 3 |" in md, md
    assert "| c | none (of 0, 1) | – | – | – | 0 | 0 | 0 | 0 |" in md, md
    assert "| b-s1 | stopped | 200 | 20 | 50 | – | 0 | 0 | 21 | 3 |" in md, md
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["fd_1step.png", "fd_2step.png", "grad_norm.png", "loss.png"]


def test_report_only_without_runs_and_corrupt_log(tmp_path: Path, capsys):
    path = write_sweep(tmp_path)
    assert "no such sweep folder" in exit_line(capsys, str(path), "--report-only")
    (tmp_path / "out" / "a-s0").mkdir(parents=True)
    (tmp_path / "out" / "a-s0" / "metrics.jsonl").write_text('{"images": 1}\nnot json\n{"images": 2}\n')
    assert "line 2 is not JSON" in exit_line(capsys, str(path), "--report-only")
    assert one_line_error(read_sweep_file, tmp_path / "missing.py").startswith("sweep file not found")
