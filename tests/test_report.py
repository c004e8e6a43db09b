"""`python -m scm_graph.report`: two tiny digits sCT runs overlaid, every plot's JSON equal to metrics.jsonl,
the page linking every PNG and the copied grids, a torn last line tolerated, one-line errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scm_graph.report import cli
from tests.helpers import REPO, assert_user_error, run_cli, train_tiny

EVERY = ("--train.log_every_images", "16", "--train.sample_every_images", "32", "--train.eval_every_images", "32")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shard_root, scm_cache) -> tuple[Path, Path]:
    """Two 64-image digits sCT runs (4 metrics lines, grids and evals at 32 and 64), different seed and lr."""
    base = tmp_path_factory.mktemp("report_runs")
    a, b = base / "runA", base / "runB"
    train_tiny("digits_sct.py", shard_root, a, 64, *EVERY)
    train_tiny("digits_sct.py", shard_root, b, 64, *EVERY, "--train.seed", "1", "--optim.lr", "3e-4")
    return a, b


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def expected_series(run: Path, key: str) -> tuple[list, list]:
    """The (x, y) a plot must hold for `key`, read straight from metrics.jsonl."""
    recs = records(run)
    steps = [r for r in recs if "event" not in r and "loss" in r]
    if key.startswith("mse_by_t/"):
        b = key.split("/", 1)[1]
        return [r["images"] for r in steps], [r["mse_by_t"].get(b) for r in steps]
    if key.startswith("fd_"):
        evs = [r for r in recs if r.get("event") == "eval"]
        return [r["images"] for r in evs], [r[key] for r in evs]
    return [r["images"] for r in steps], [r[key] for r in steps]


def test_report_of_two_runs(tmp_path: Path, two_runs):
    a, b = two_runs
    out = tmp_path / "rep"
    cli.main([str(a), str(b), "--out", str(out)])
    index = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    names = {"loss", "mse", "grad_norm", "tangent_norm", "lr", "img_per_s", "w_range", "mse_by_t", "eval_fd_1step", "eval_fd_2step"}
    assert set(pngs) == {f"{n}.png" for n in names}
    srcs = set(re.findall(r"src='([^']+)'", index))
    assert {p for p in pngs} <= srcs  # every plot, by relative path
    assert all(not s.startswith(("/", "http")) for s in srcs)
    for n in names:
        assert (out / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{n}.json" in index
        plot = json.loads((out / f"{n}.json").read_text())
        runs = {s["run"] for s in plot["series"]}
        assert runs == {"runA", "runB"}, (n, runs)  # overlaid, named by run folder
        for s in plot["series"]:
            x, y = expected_series(a if s["run"] == "runA" else b, s["key"])
            assert (s["x"], s["y"]) == (x, y), (n, s["run"], s["key"])
    keys = {s["key"] for s in json.loads((out / "mse_by_t.json").read_text())["series"]}
    assert {k for r in (a, b) for rec in records(r) if "mse_by_t" in rec for k in (f"mse_by_t/{b}" for b in rec["mse_by_t"])} == keys
    lr = json.loads((out / "lr.json").read_text())["series"]
    assert {s["run"]: s["y"][0] for s in lr} == {"runA": 1e-3, "runB": 3e-4}
    for run in (a, b):  # the newest grid, copied in and shown
        newest = max((run / "grids").glob("grid-*.png"))
        copy = out / "grids" / f"{run.name}-{newest.name}"
        assert copy.read_bytes() == newest.read_bytes() and f"grids/{copy.name}" in srcs
        assert "digits_sct" in index and f"{max(r['images'] for r in records(run)):,}" in index


def test_default_out_and_torn_last_line(tmp_path: Path, two_runs):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"images": 80, "step": 5, "loss": 0.')  # a kill mid-write
    res = run_cli("scm_graph.report", run, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {run / 'report' / 'index.html'} (10 plots, 1 run)"
    loss = json.loads((run / "report" / "loss.json").read_text())["series"]
    assert loss[0]["x"] == expected_series(two_runs[0], "loss")[0]  # the torn line left out


def test_bad_input(tmp_path: Path, two_runs):
    a, b = two_runs
    assert_user_error(run_cli("scm_graph.report", tmp_path / "missing", timeout=60), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("scm_graph.report", tmp_path / "empty", timeout=60), "not a run folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_bytes(b'\x00\xffgarbage\n{"images": 16, "loss": 1.0}\n')
    assert_user_error(run_cli("scm_graph.report", bad, timeout=60), "line 1 is not JSON")
    (bad / "metrics.jsonl").write_text('{"event": "start", "images": 0}\n')
    assert_user_error(run_cli("scm_graph.report", bad, timeout=60), "no metrics line yet")
    assert_user_error(run_cli("scm_graph.report", a, b, timeout=60), "--out")
    assert_user_error(run_cli("scm_graph.report", a, a, "--out", tmp_path / "r", timeout=60), "twice")
    assert not (tmp_path / "r").exists()  # nothing written before the input is checked


def test_torch_free():
    """The report reads files only: it never imports torch (it starts fast, beside a training run)."""
    code = "import sys, scm_graph.report.cli; assert 'torch' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
