"""Multi-process training (scm_graph.train.parallel) on the CPU: torchrun, gloo, 2 processes.

- The wrapped step equals one process: 2 processes x B/2 under DDP and FSDP2, with accum 1 and 2, against
  one plain process x B (same images, noise, times, dropout key), for sCT, sCD and diffusion, in float64:
  losses and parameters after 3 steps, and the JVP pass on the gathered weights (tests/train/parallel_worker.py).
- Gradient accumulation in one process equals the whole batch.
- Through the CLI under torchrun: an interrupted and resumed 2-process run equals the uninterrupted one;
  resuming with 2 processes from a 1-process checkpoint (and back, through FSDP2) continues the same global
  batch and image count; a process killed mid-run stops the job (one line per process) and the last
  checkpoint loads; a global batch that does not split is one line.
- Evaluation during a 2-process run (each process scores its share of the samples, FSDP2 EMA gathered on
  every process) logs what one process measures of the kept best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scm_graph.checkpoint import load_checkpoint, read_metadata
from scm_graph.eval.evaluator import evaluate
from scm_graph.model import build_model
from scm_graph.objectives import StepInputs
from scm_graph.sample.generate import load_generator
from scm_graph.spec import ObjectiveSpec, OptimSpec, spec_from_json
from scm_graph.train.step import TrainStep
from tests.helpers import (
    REPO,
    SPECS,
    assert_tensors_identical,
    cli_env,
    read_metrics,
    step_records,
    tiny_args,
    tiny_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("scm_cache")]

# float64 sums of the same terms in another order differ by a few ulp; 2 processes reduce in a different
# order than one, so "identical" means within 1e-12 here (the updates themselves are about 1e-3).
TOL = 1e-12


def torchrun(*args: str, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]


def train_cmd(out: Path, root: Path, total: int, *extra: str, n: int = 2) -> list[str]:
    args = ["-m", "scm_graph.train", str(SPECS / "digits_sct.py"), *tiny_args(root, out, total, "--net.dropout", "0.1"), *extra]
    return torchrun(*args, n=n) if n else [sys.executable, *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=cli_env())


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def test_compiled_wrapped_step_equals_one_process(tmp_path):
    """`train.compile` (the default) under DDP: the compiled JVP pass and gradient pass, 2 processes, 3 steps."""
    out = tmp_path / "results.json"
    ok(run(torchrun("-m", "tests.train.parallel_worker", str(out), "--compiled"), timeout=900))
    results = json.loads(out.read_text())
    assert list(results) == ["sct/ddp/compiled"]
    for case, r in results.items():
        assert r["moved"] > 1e-4, case
        assert r["loss"] < TOL and r["params"] < TOL, (case, r)


def test_wrapped_steps_equal_one_process(tmp_path):
    out = tmp_path / "results.json"
    ok(run(torchrun("-m", "tests.train.parallel_worker", str(out)), timeout=600))
    results = json.loads(out.read_text())
    assert results.pop("ddp_bucket_storages") == 1  # DDP's gradients are its buckets: no second copy
    assert len(results) == 14  # {sct, scd, diffusion} x {ddp, fsdp} x accum {1, 2}; sCT x {ddp, fsdp} decided on the device
    for case, r in results.items():
        assert r["moved"] > 1e-4, case  # the 3 steps really trained
        assert r["loss"] < TOL and r["params"] < TOL and r["jvp"] < TOL, (case, r)


def test_accumulation_equals_the_whole_batch():
    """accum 2 x B/2 in one process gives the parameters of one step on B (sCT, dropout on, float64)."""
    spec = tiny_spec(dropout=0.2)
    spec = dataclasses.replace(spec, objective=ObjectiveSpec(sigma_d=0.5, warmup_images=0), optim=OptimSpec(kind="adam", lr=1e-3))
    g = torch.Generator().manual_seed(0)
    data = [StepInputs(torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5,
                       torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5,
                       torch.rand(8, generator=g, dtype=torch.float64) + 0.1, None, torch.tensor(7 + s),
                       torch.tensor(1.0, dtype=torch.float64)) for s in range(3)]
    params = []
    for accum in (1, 2, 4):
        s = dataclasses.replace(spec, train=dataclasses.replace(spec.train, accum=accum, compile=False))
        torch.manual_seed(0)
        model = build_model(s).double()
        step = TrainStep(model, s)
        for inp in data:
            step(inp)
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for other in params[1:]:
        assert max(float((other[k] - params[0][k]).abs().max()) for k in other) < TOL


def test_resumed_two_process_run_equals_the_uninterrupted_one(tmp_path, shard_root):
    ok(run(train_cmd(tmp_path / "a", shard_root, 64)))
    ok(run(train_cmd(tmp_path / "b", shard_root, 32)))
    res = run(train_cmd(tmp_path / "b", shard_root, 64, "--resume"))
    ok(res)
    assert res.stdout.count("done:") == 1  # rank 0 alone prints
    assert step_records(tmp_path / "a") == step_records(tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.safetensors"), load_checkpoint(tmp_path / "b" / "ckpt.safetensors")
    assert (a.step, a.images) == (b.step, b.images) == (4, 64)
    assert_tensors_identical(a.net, b.net)
    assert_tensors_identical(a.ema, b.ema)
    for i in a.optim["state"]:
        assert_tensors_identical(a.optim["state"][i], b.optim["state"][i])


def test_resume_changes_the_number_of_processes(tmp_path, shard_root):
    """1 process -> 2 (FSDP2) -> 1: the global batch and the image count go on; the sharded state round-trips."""
    out = tmp_path / "run"
    ok(run(train_cmd(out, shard_root, 32, n=0)))
    first = load_checkpoint(out / "ckpt.safetensors")
    ok(run(train_cmd(out, shard_root, 64, "--resume", "--train.parallel", "fsdp")))
    mid = load_checkpoint(out / "ckpt.safetensors")
    assert (mid.step, mid.images) == (4, 64)
    full = {k: v.shape for k, v in first.net.items()}
    assert {k: v.shape for k, v in mid.net.items()} == full == {k: v.shape for k, v in mid.ema.items()}  # gathered, not shards
    ok(run(train_cmd(out, shard_root, 96, "--resume", n=0)))
    end = load_checkpoint(out / "ckpt.safetensors")
    assert (end.step, end.images) == (6, 96)
    steps = step_records(out)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    # the optimiser state went through the sharded load and the gathered save whole: Adam's step count is 6.
    # w_phi gets no gradient (digits_sct has adaptive weighting off): no state in one process, which the sharded
    # load must accept; FSDP2 hands it zero gradients, which leave it at zero
    names = [n for n, _ in build_model(spec_from_json(end.spec_json)).named_parameters()]
    trained = {i for i, n in enumerate(names) if not n.startswith("w_phi.")}
    assert trained and all(int(s["step"]) == 6 for i, s in end.optim["state"].items() if int(i) in trained)
    assert all(not end.net[n].any() for n in names if n.startswith("w_phi."))


def test_a_killed_process_stops_the_job(tmp_path, shard_root):
    out = tmp_path / "run"
    cmd = train_cmd(out, shard_root, 1_000_000, "--train.ckpt_every_images", "64")
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt.safetensors").exists() or len(step_records(out)) < 8:
            assert job.poll() is None and time.monotonic() < deadline, "the job did not get going"
            time.sleep(0.2)
        workers = _children(job.pid)
        rank1 = next(p for p in workers if _env(p).get("RANK") == "1")
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=60)  # bounded: torchrun stops the rest at once
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "error: rank 0: " in err, err[-2000:]
    ckpt = load_checkpoint(out / "ckpt.safetensors")  # whole: checksums verified
    assert ckpt.images % 64 == 0 and ckpt.images > 0


def _children(pid: int) -> list[int]:
    res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def _env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def test_a_batch_that_does_not_split_is_one_line(tmp_path, shard_root):
    res = run(train_cmd(tmp_path / "r", shard_root, 64, "--train.batch", "10", "--train.accum", "2"))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    want = "train.batch 10 does not divide into 2 processes x train.accum 2 micro-batches"
    assert f"error: rank 0: {want}" in lines, res.stderr[-2000:]
    assert all(want in ln or ln.startswith(("error: rank 1: stopped", "error: rank 1: lost")) for ln in lines), lines


def poison_cmd(out: Path, root: Path, ranks: str, total: int, *extra: str) -> list[str]:
    args = ["-m", "tests.train.poison_runner", ranks, "2", "--", str(SPECS / "digits_sct.py"), *tiny_args(root, out, total), *extra]
    return torchrun(*args)


def test_processes_agree_on_nonfinite_batches(tmp_path, shard_root):
    """Rank 1's samples all non-finite from the 3rd step: masked and counted over both processes, the updates go on
    with rank 0's samples (both processes apply them, so the weights stay one network); both ranks' samples
    non-finite: every process stops at the same step with the same line, and the last checkpoint is kept."""
    out = tmp_path / "half"
    ok(run(poison_cmd(out, shard_root, "1", 64)))
    steps = step_records(out)
    assert [steps[s]["nonfinite"] for s in (1, 2, 3, 4)] == [0, 0, 8, 8]  # from the 3rd step: 8 of its 16 samples
    assert all(steps[s]["skipped"] == 0 for s in steps)
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "ckpt.safetensors").net.values())

    out = tmp_path / "all"
    res = run(poison_cmd(out, shard_root, "0,1", 320, "--train.ckpt_every_images", "16"))
    assert res.returncode != 0
    lines = sorted(ln for ln in res.stderr.splitlines() if ln.startswith("error: rank "))
    want = ("every sample had a non-finite tangent or prediction for 10 consecutive steps (up to step 12); "
            f"training stopped, the last checkpoint {out / 'ckpt.safetensors'} is kept")
    # rank 1 halts at the same step, unless rank 0's exit reaches it first: torchrun's stop, or a collective
    # that loses rank 0 (one line either way)
    others = ("error: rank 1: stopped, because another process of the job failed", "error: rank 1: lost the other processes")
    assert lines[0] == f"error: rank 0: {want}", res.stderr[-2000:]
    assert len(lines) == 2 and (lines[1] == f"error: rank 1: {want}" or lines[1].startswith(others)), lines
    kept = load_checkpoint(out / "ckpt.safetensors")  # written at step 11; the halting step 12 wrote nothing
    assert kept.images == 176 and all(torch.isfinite(v).all() for v in kept.net.values())


EDM2_ARGS = ("--net.arch", "edm2", "--net.edm2.channels", "8", "--net.edm2.channel_mult", "1", "2",
             "--net.edm2.num_blocks", "1", "--net.edm2.head_dim", "8", "--net.edm2.attn_resolutions", "4")


def test_edm2_under_ddp_and_fsdp_equals_one_process(tmp_path, shard_root):
    """EDM2's forced weight normalisation (renormalize_ after each optimiser step) on DDP replicas and on FSDP2
    shards; the digits' 1-channel output convolution leaves rank 1 a shard with no rows."""
    for name, n, extra in (("one", 0, ()), ("ddp", 2, ()), ("fsdp", 2, ("--train.parallel", "fsdp"))):
        ok(run(train_cmd(tmp_path / name, shard_root, 32, *EDM2_ARGS, *extra, n=n)))
    one = load_checkpoint(tmp_path / "one" / "ckpt.safetensors")
    for name in ("ddp", "fsdp"):
        other = load_checkpoint(tmp_path / name / "ckpt.safetensors")
        assert (other.step, other.images) == (one.step, one.images) == (2, 32)
        for k, v in one.net.items():
            torch.testing.assert_close(other.net[k], v, atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
    rms = one.net["net.enc.0.conv_res0.weight"].flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-5, rtol=0)  # each weight back on its sphere


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_process_evaluation_splits_the_samples_and_keeps_the_best(tmp_path, shard_root, kind):
    """Under torchrun every process evaluates its share of the samples (moments summed over the job): the logged
    2-step FDs are what one process measures of the same EMA, here that of the kept best.safetensors."""
    out = tmp_path / kind
    ok(run(train_cmd(out, shard_root, 64, "--train.parallel", kind, "--train.eval_every_images", "32",
                     "--train.eval_samples", "40", "--train.ckpt_every_images", "32", "--train.keep_best", "fd_2step")))
    evals = [r for r in read_metrics(out) if r.get("event") == "eval"]
    assert [e["images"] for e in evals] == [32, 64]
    best = min(evals, key=lambda e: e["fd_2step"])
    meta = json.loads(read_metadata(out / "best.safetensors")["meta"])
    assert (meta["best"]["value"], meta["best"]["images"]) == (best["fd_2step"], best["images"])
    (row,) = evaluate(load_generator(out / "best.safetensors", device="cpu"), [2], 40)
    assert row.fd == pytest.approx(best["fd_2step"], rel=1e-6)  # float64 sums in another order, other threads
