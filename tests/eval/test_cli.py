"""The evaluation CLI: digits FD of 1-/2-step (or PF-ODE) samples, the real-data floor, bad checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

import scm_graph.eval.cli as ev_cli
import scm_graph.eval.evaluator as ev
from scm_graph.sample.generate import generate, load_generator, to_uint8
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


def _fd_reference(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of Gaussian fits, with numpy + scipy.linalg.sqrtm (independent of scm_graph.eval.frechet)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)  # unbiased: X_c^T X_c / (N - 1)
    covmean = np.real(sqrtm(s1 @ s2))  # (S1 S2)^{1/2}
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))  # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})


def test_evaluate_fd_matches_independent_reference_and_seed(sct_ckpt: Path):
    """evaluate()'s FD (1 and 2 steps, two seeds) equals the FD of samples generated here, featurised by the
    digits classifier and scored with numpy + scipy's sqrtm; another seed gives another value. The real-data
    floor is checked the same way. n = 128 > 64 features keeps the covariances non-singular."""
    from scm_graph.data.digits import load_digits_uint8
    from scm_graph.eval.digits import digits_features, digits_floor_fd

    g = load_generator(sct_ckpt)
    real = digits_features(load_digits_uint8()[0])
    n = 128
    fds = {}
    for seed in (3, 4):
        rows = ev.evaluate(g, [1, 2], n=n, seed=seed)
        assert [(r.steps, r.n) for r in rows] == [(1, n), (2, n)]
        for r in rows:
            x = to_uint8(generate(g, n, steps=r.steps, seed=seed, sample_ids=torch.arange(n)), g.spec)
            ref = _fd_reference(digits_features(x), real)
            assert r.fd == pytest.approx(ref, rel=1e-8), (seed, r.steps)
            fds[seed, r.steps] = r.fd
    again = ev.evaluate(g, [1], n=n, seed=3)
    assert again[0].fd == fds[3, 1] and fds[3, 1] != fds[4, 1] and fds[3, 2] != fds[4, 2]
    a = ev.evaluate(g, [1], n=32, seed=3)
    b = ev.evaluate(g, [1], n=32, seed=3)
    c = ev.evaluate(g, [1], n=32, seed=4)
    assert a[0].fd == b[0].fd and a[0].fd != c[0].fd
    assert digits_floor_fd(0) == digits_floor_fd(0) > 0
    perm = np.random.default_rng(0).permutation(real.shape[0])  # two random halves of the real set
    h = real.shape[0] // 2
    assert digits_floor_fd(0) == pytest.approx(_fd_reference(real[perm[:h]], real[perm[h:]]), rel=1e-8)


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


@pytest.mark.parametrize("args,message", [
    (["--n", "1"], "--n must be at least 2, not 1"),
    (["--steps", "0"], "--steps must each be at least 1, not 0"),
    (["--steps", "2", "-1"], "--steps must each be at least 1, not 2 -1"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, not nan"),
    (["--guidance", "1.5"], "--guidance needs a class-conditional model; this one is unconditional"),
    (["--t-mid", "0"], "--t-mid must lie in (0, t_max) = (0, 1.5645) for sigma_d 0.5, not 0.0"),
    (["--t-mid", "-1"], "--t-mid must lie in (0, t_max) = (0, 1.5645) for sigma_d 0.5, not -1.0"),
    (["--t-mid", "1.57"], "--t-mid must lie in (0, t_max) = (0, 1.5645) for sigma_d 0.5, not 1.57"),
])
def test_cli_bad_values(sct_ckpt: Path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        ev_cli.main(["--ckpt", str(sct_ckpt), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("args,needles", [
    (["--n", "many"], ("argument --n", "invalid int value", "'many'")),
    ([], ("required", "--ckpt")),
])
def test_cli_argparse_errors_are_one_line(tmp_path: Path, args, needles):
    """argparse's own errors come out as one `error:` line that names the argument and what is wrong with it."""
    assert_user_error(run_cli("scm_graph.eval", *args, cwd=tmp_path, timeout=120), *needles)


def test_guided_fd_of_a_class_conditional_model(tmp_path: Path, shard_root: Path, capsys):
    """--guidance S: the FD of samples drawn with the CFG scale s (here a class-conditional diffusion model's
    guided PF-ODE), the same as scoring generate(..., guidance=s) directly; another s gives another FD."""
    from scm_graph.eval.digits import digits_fd
    from tests.helpers import train_tiny

    ckpt = train_tiny("digits_teacher.py", shard_root, tmp_path / "teacher", 32)
    capsys.readouterr()  # the training's own output
    ev_cli.main(["--ckpt", str(ckpt), "--steps", "4", "--n", "80", "--guidance", "2", "--json"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["guidance"] == 2.0 and row["sampler"] == "heun"
    g = load_generator(ckpt)
    direct = digits_fd(to_uint8(generate(g, 80, steps=4, guidance=2.0, seed=0, sample_ids=torch.arange(80)), g.spec))
    assert row["fd"] == pytest.approx(direct, rel=1e-9)
    plain = ev.evaluate(g, [4], n=80)[0]
    assert plain.guidance == 1.0 and abs(plain.fd - row["fd"]) > 1e-6


def test_cli_t_mid_reaches_the_2_step_samples(sct_ckpt: Path, capsys):
    """--t-mid T: the 2-step row scores samples at [t_max, T] (the same as evaluate(t_mid=T)), not the default's
    (the checkpoint's train.eval_t_mid, 1.1); the 1-step row has no t_mid and does not change."""
    g = load_generator(sct_ckpt)
    ev_cli.main(["--ckpt", str(sct_ckpt), "--steps", "1", "2", "--n", "64", "--json", "--t-mid", "0.8"])
    ev_cli.main(["--ckpt", str(sct_ckpt), "--steps", "1", "2", "--n", "64", "--json"])
    one, two, one_default, two_default = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert (one["t_mid"], two["t_mid"], one_default["t_mid"], two_default["t_mid"]) == (None, 0.8, None, 1.1)
    assert one["fd"] == one_default["fd"] and two["fd"] != two_default["fd"]
    assert two["fd"] == pytest.approx(ev.evaluate(g, [2], 64, t_mid=0.8)[0].fd, rel=1e-9)
    assert two_default["fd"] == pytest.approx(ev.evaluate(g, [2], 64)[0].fd, rel=1e-9)


def test_cli_t_mid_of_a_diffusion_checkpoint(diffusion_ckpt: Path, capsys):
    capsys.readouterr()  # a session fixture's training output, if it trained just now
    with pytest.raises(SystemExit) as e:
        ev_cli.main(["--ckpt", str(diffusion_ckpt), "--steps", "4", "--t-mid", "0.8"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --t-mid sets consistency sampling's intermediate time; this diffusion model integrates the PF-ODE"]
