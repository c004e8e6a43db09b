"""The evaluation CLI: digits FD of 1-/2-step (or PF-ODE) samples, the real-data floor, bad checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import scm_graph.eval.cli as ev_cli
import scm_graph.eval.evaluator as ev
from scm_graph.sample.generate import load_generator
from tests.helpers import assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")


def _final_eval(ckpt: Path) -> dict:
    recs = [json.loads(ln) for ln in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == "eval"][-1]


def test_cli_json_with_floor(tmp_path: Path, sct_ckpt: Path):
    res = run_cli("scm_graph.eval", "--ckpt", sct_ckpt, "--steps", "1", "2", "--n", "64", "--json", "--floor",
                  cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]
    assert len(rows) == 3
    for r, steps in zip(rows[:2], (1, 2)):
        assert r["ckpt"] == str(sct_ckpt) and r["sampler"] == "consistency"
        assert (r["steps"], r["nfe"], r["n"]) == (steps, steps, 64)
        assert isinstance(r["fd"], float) and math.isfinite(r["fd"]) and r["fd"] >= 0
        assert r["seconds"] >= 0
    floor = rows[2]
    assert floor["sampler"] == "real-halves" and isinstance(floor["fd"], float) and 0 <= floor["fd"] < rows[0]["fd"]
    # the same numbers as the training run's final evaluation (64 samples, seed 0, EMA weights)
    last = _final_eval(sct_ckpt)
    assert rows[0]["fd"] == pytest.approx(last["fd_1step"], rel=1e-6)
    assert rows[1]["fd"] == pytest.approx(last["fd_2step"], rel=1e-6)


def test_evaluate_in_process_matches_floor_and_seed(sct_ckpt: Path):
    from scm_graph.eval.digits import digits_floor_fd

    g = load_generator(sct_ckpt)
    a = ev.evaluate(g, [1], n=32, seed=3)
    b = ev.evaluate(g, [1], n=32, seed=3)
    c = ev.evaluate(g, [1], n=32, seed=4)
    assert a[0].fd == b[0].fd and a[0].fd != c[0].fd
    assert digits_floor_fd(0) == digits_floor_fd(0) > 0


def test_cli_table(sct_ckpt: Path, capsys):
    ev_cli.main(["--ckpt", str(sct_ckpt), "--steps", "1", "--n", "32", "--floor"])
    out = capsys.readouterr().out
    assert "digits FD" in out and "consistency" in out and "real halves" in out


def test_cli_diffusion_solvers(diffusion_ckpt: Path, capsys):
    ev_cli.main(["--ckpt", str(diffusion_ckpt), "--steps", "2", "3", "--n", "16", "--json", "--solver", "euler"])
    ev_cli.main(["--ckpt", str(diffusion_ckpt), "--steps", "2", "--n", "16", "--json"])
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("euler", 2, 2), ("euler", 3, 3), ("heun", 2, 3)]
    assert all(math.isfinite(r["fd"]) for r in rows)


def test_cli_non_digits_checkpoint(tmp_path: Path, cifarlike_ckpt: Path):
    res = run_cli("scm_graph.eval", "--ckpt", cifarlike_ckpt, "--steps", "1", "--n", "16", cwd=tmp_path, timeout=300)
    assert_user_error(res, "digits")


def test_cli_missing_checkpoint(tmp_path: Path):
    res = run_cli("scm_graph.eval", "--ckpt", tmp_path / "nope.safetensors", cwd=tmp_path, timeout=300)
    assert_user_error(res, "nope.safetensors")


@pytest.mark.parametrize("args,needle", [(["--n", "1"], "--n"), (["--steps", "0"], "--steps")])
def test_cli_bad_values(sct_ckpt: Path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        ev_cli.main(["--ckpt", str(sct_ckpt), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.parametrize("args", [["--n", "many"], []])
def test_cli_argparse_errors_are_one_line(tmp_path: Path, args):
    assert_user_error(run_cli("scm_graph.eval", *args, cwd=tmp_path, timeout=120))
