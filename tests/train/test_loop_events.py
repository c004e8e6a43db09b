"""The loop during a run, not only at its end: the EMA (with ramp-up) after every step against an independent
recomputation, and the periodic metrics lines, sample grids, checkpoints and FD evaluations as they happen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import scm_graph.train.loop as tr
from scm_graph.checkpoint import load_checkpoint
from scm_graph.train.step import TrainStep
from tests.helpers import PAPER_SCT, read_metrics, step_records, tiny_args, train_main

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")

BATCH = 16  # tiny_args' batch


def _record_raw_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Wrap TrainStep.__call__: record the weights before the first step, then after every step."""
    seen: list[dict[str, torch.Tensor]] = []
    call = TrainStep.__call__

    def recording(self, inp, first=0, images=0):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in self.params.items()})
        out = call(self, inp, first, images)
        seen.append({k: v.detach().clone() for k, v in self.params.items()})
        return out

    monkeypatch.setattr(TrainStep, "__call__", recording)
    return seen


# ----------------------------------------------------------------------------- EMA with ramp-up


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _recompute_ema(seen: list[dict[str, torch.Tensor]], rampup: float, halflife: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """ema_0 = initial weights; after step i (images = batch * i): ema <- beta ema + (1 - beta) theta_i,
    beta = 0.5^(batch / h), h = min(half-life, rampup * images) when rampup > 0, else the half-life. float64."""
    ema = {k: v.double() for k, v in seen[0].items()}
    betas = []
    for i, theta in enumerate(seen[1:], start=1):
        h = min(halflife, rampup * BATCH * i) if rampup > 0 else halflife
        beta = 0.5 ** (BATCH / h)
        betas.append(beta)
        ema = {k: beta * ema[k] + (1 - beta) * theta[k].double() for k in ema}
    return ema, betas


@pytest.mark.parametrize("rampup,halflife", [(1.0, 40.0), (0.5, 1e6), (0.0, 40.0)])
def test_ema_in_checkpoint_equals_recomputation(tmp_path: Path, shard_root: Path, monkeypatch, rampup: float, halflife: float):
    """4 steps of 16 images: the checkpoint's EMA equals the recomputation from the raw weights of each step."""
    seen = _record_raw_weights(monkeypatch)
    run = tmp_path / "run"
    # a large lr, so the raw weights move well away from the initial ones in 4 steps
    train_main("digits_sct.py", *tiny_args(shard_root, run, 64, "--train.ema_rampup", str(rampup),
                                           "--train.ema_halflife_images", str(halflife), "--optim.lr", "0.05", *PAPER_SCT))
    assert len(seen) == 5  # the initial weights and 4 steps
    ema, betas = _recompute_ema(seen, rampup, halflife)
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert ck.step == 4
    assert ck.ema.keys() == ema.keys()
    for k, v in ck.net.items():
        assert torch.equal(v, seen[-1][k]), k  # the recorded weights are the ones trained
    for k in ema:
        torch.testing.assert_close(ck.ema[k].double(), ema[k], rtol=0, atol=1e-6)

    # the comparison can tell: the EMA is neither the raw nor the initial weights, and the ramp-up matters
    assert 0 < min(betas) and max(betas) < 1, betas
    assert _gap(ema, seen[-1]) > 1e-3 and _gap(ema, seen[0]) > 1e-3
    if rampup > 0:
        assert _gap(ema, _recompute_ema(seen, 0.0, halflife)[0]) > 1e-3


# ----------------------------------------------------------------------------- periodic events


def _watch_checkpoints(monkeypatch, run: Path) -> list[dict]:
    """Wrap the loop's save_checkpoint: after each write, read the file back from disk and note what else
    the run folder holds at that moment (metrics lines, grids)."""
    calls: list[dict] = []
    save = tr.save_checkpoint

    def watching(path, ckpt):
        save(path, ckpt)
        back = load_checkpoint(path)
        recs = read_metrics(run)
        calls.append({
            "step": back.step, "images": back.images,
            "logged": [r["images"] for r in recs if "loss" in r and "event" not in r],
            "evals": [r["images"] for r in recs if r.get("event") == "eval"],
            "grids": sorted(p.name for p in (run / "grids").glob("*.png")),
            "ended": any(r.get("event") == "end" for r in recs),
            "last": back.meta.get("last", {}),
        })

    monkeypatch.setattr(tr, "save_checkpoint", watching)
    return calls


def _every_args(every: int) -> tuple[str, ...]:
    return ("--train.log_every_images", str(every), "--train.sample_every_images", str(every),
            "--train.ckpt_every_images", str(every), "--train.eval_every_images", str(every))


def _grid(images: int) -> str:
    return f"grid-{images:012d}.png"


def _assert_events(run: Path, calls: list[dict], at: list[int]) -> None:
    """Metrics lines, grids, checkpoints and evals exactly at the image counts `at` (the last is the end)."""
    assert [(c["step"], c["images"]) for c in calls] == [(i // BATCH, i) for i in at]
    # each checkpoint was on disk while the run went on: after this count's metrics line (its meta 'last'
    # carries it) and every earlier count's eval and grid, before any later count's. Whether this count's
    # eval and grid come before or after its checkpoint is left open (the optional work may follow the state).
    for c, i in zip(calls, at):
        done, before = [j for j in at if j <= i], [j for j in at if j < i]
        assert c["logged"] == done, c
        assert c["evals"] in (before, done) and c["grids"] in ([_grid(j) for j in before], [_grid(j) for j in done]), c
        assert not c["ended"]
        assert c["last"]["images"] == i and math.isfinite(c["last"]["loss"]), c
    recs = step_records(run)
    assert sorted(recs) == [i // BATCH for i in at]
    assert [recs[s]["images"] for s in sorted(recs)] == at
    evals = [r for r in read_metrics(run) if r.get("event") == "eval"]
    assert [e["images"] for e in evals] == at
    for e in evals:
        assert {"fd_1step", "fd_2step"} <= e.keys()
        assert all(math.isfinite(e[k]) and e[k] >= 0 for k in ("fd_1step", "fd_2step"))
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == [_grid(i) for i in at]
    end = read_metrics(run)[-1]
    assert (end["event"], end["images"], end["step"]) == ("end", at[-1], at[-1] // BATCH)


def test_periodic_events_during_the_run(tmp_path: Path, shard_root: Path, monkeypatch):
    """64 images, batch 16, everything every 32: metrics, grid, eval and a checkpoint (step 2, on disk)
    at 32, while the run goes on, then again at 64."""
    run = tmp_path / "run"
    calls = _watch_checkpoints(monkeypatch, run)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 64, *_every_args(32)))
    _assert_events(run, calls, [32, 64])
    assert calls[0]["step"] == 2


def test_odd_every_fires_when_a_multiple_is_crossed(tmp_path: Path, shard_root: Path, monkeypatch):
    """every 24 with batch 16: the counts 16, 32, ..., 112 cross 24, 48, 72, 96 at 32, 48, 80, 96; the end is 112."""
    run = tmp_path / "run"
    calls = _watch_checkpoints(monkeypatch, run)
    train_main("digits_sct.py", *tiny_args(shard_root, run, 112, *_every_args(24)))
    _assert_events(run, calls, [32, 48, 80, 96, 112])


def test_every_crossing_rule():
    assert [i for i in range(16, 129, 16) if tr._every(i - 16, i, 24)] == [32, 48, 80, 96, 128]
    assert [i for i in range(16, 129, 16) if tr._every(i - 16, i, 32)] == [32, 64, 96, 128]
    assert not any(tr._every(i - 16, i, 0) for i in range(16, 129, 16))  # 0 = never (the end still fires)
    assert tr._every(0, 100, 7) and not tr._every(8, 13, 7)  # one event however many multiples a step crosses
