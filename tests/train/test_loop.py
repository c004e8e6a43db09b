"""Training runs end to end: exact resume, compiled == eager, smoke runs of every spec, init_from, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import scm_graph.train.cli as cli
import scm_graph.train.loop as tr
from scm_graph.checkpoint import load_checkpoint
from scm_graph.errors import UserError
from scm_graph.spec import spec_from_json, spec_to_json
from scm_graph.train.step import StepOut
from tests.helpers import (
    PAPER_SCT,
    PROGRESS_LINE,
    SPECS,
    STEP_KEYS,
    assert_tensors_identical,
    assert_user_error,
    read_metrics,
    run_cli,
    step_records,
    tiny_args,
    tiny_spec,
    train_main,
)

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")



# ----------------------------------------------------------------------------- exact resume


def test_resume_equals_uninterrupted(tmp_path: Path, shard_root: Path):
    """8 steps in one go == 4 steps, then --resume to 8: identical metrics and bit-identical weights."""
    extra = ("--net.dropout", "0.1")
    a, b = tmp_path / "a", tmp_path / "b"
    train_main("digits_sct.py", *tiny_args(shard_root, a, 128, *extra))
    train_main("digits_sct.py", *tiny_args(shard_root, b, 64, *extra))
    assert load_checkpoint(b / "ckpt.safetensors").images == 64
    # a crash between checkpoints leaves lines past the checkpoint; --resume must drop them
    with open(b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"images": 80, "step": 5, "loss": 123.0, "marker": "stale"}) + "\n")
    train_main("digits_sct.py", *tiny_args(shard_root, b, 128, *extra), "--resume")

    ra, rb = step_records(a), step_records(b)
    assert sorted(ra) == sorted(rb) == list(range(1, 9))
    for s in range(5, 9):
        assert set(STEP_KEYS) <= ra[s].keys()
        assert ra[s] == rb[s], (s, ra[s], rb[s])
    assert all(rb[s]["images"] == 16 * s for s in rb)
    lines = read_metrics(b)
    assert not any(r.get("marker") == "stale" or r.get("loss") == 123.0 for r in lines)
    assert [r.get("event") for r in lines].count("start") == 1
    assert [r["images"] for r in lines if r.get("event") == "end"] == [64, 128]

    ca, cb = load_checkpoint(a / "ckpt.safetensors"), load_checkpoint(b / "ckpt.safetensors")
    assert (ca.step, ca.images) == (cb.step, cb.images) == (8, 128)
    assert_tensors_identical(ca.net, cb.net)
    assert_tensors_identical(ca.ema, cb.ema)
    assert ca.optim["param_groups"] == cb.optim["param_groups"]
    for i in ca.optim["state"]:
        for k, v in ca.optim["state"][i].items():
            w = cb.optim["state"][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)
    assert torch.equal(ca.rng["noise"], cb.rng["noise"])
    # the final FD evaluation of both runs sees the same EMA weights
    end_a, end_b = read_metrics(a)[-1], read_metrics(b)[-1]
    assert end_a["fd_1step"] == end_b["fd_1step"] and end_a["fd_2step"] == end_b["fd_2step"]


def test_fp16_resume_equals_uninterrupted(tmp_path: Path, shard_root: Path):
    """fp16: 4 steps in one go == 2 steps, then --resume to 4; the loss scaler's state rides in the checkpoint."""
    extra = ("--train.precision", "fp16", "--train.eval_samples", "16")
    a, b = tmp_path / "a", tmp_path / "b"
    train_main("digits_sct.py", *tiny_args(shard_root, a, 64, *extra))
    train_main("digits_sct.py", *tiny_args(shard_root, b, 32, *extra))
    mid = load_checkpoint(b / "ckpt.safetensors")
    assert mid.scaler is not None and mid.scaler["_growth_tracker"] == 2 and mid.scaler["scale"] == 2.0**16
    train_main("digits_sct.py", *tiny_args(shard_root, b, 64, *extra), "--resume")
    ra, rb = step_records(a), step_records(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3, 4]
    for s in (3, 4):
        assert ra[s] == rb[s] and ra[s]["nonfinite"] == ra[s]["skipped"] == 0, (s, ra[s], rb[s])
    ca, cb = load_checkpoint(a / "ckpt.safetensors"), load_checkpoint(b / "ckpt.safetensors")
    assert ca.scaler == cb.scaler and ca.scaler["_growth_tracker"] == 4  # a fresh scaler would say 2
    assert spec_from_json(ca.spec_json).train.precision == "fp16"
    assert_tensors_identical(ca.net, cb.net)
    assert_tensors_identical(ca.ema, cb.ema)
    assert all(v.dtype == torch.float32 for v in ca.net.values())


def test_resume_may_change_precision(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    train_main("digits_diffusion.py", *tiny_args(shard_root, run, 16))
    assert load_checkpoint(run / "ckpt.safetensors").scaler is None  # fp32: no scaler state
    train_main("digits_diffusion.py", *tiny_args(shard_root, run, 32, "--train.precision", "bf16"), "--resume")
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert ck.step == 2 and spec_from_json(ck.spec_json).train.precision == "bf16"


def test_spec_json_without_precision_loads_as_fp32():
    """Checkpoints written before train.precision existed still load (and resume as fp32)."""
    d = json.loads(spec_to_json(tiny_spec()))
    del d["train"]["precision"]
    spec = spec_from_json(json.dumps(d))
    assert spec.train.precision == "fp32" and spec == tiny_spec()


def _poison_inputs(monkeypatch, samples: slice, from_step: int = 0) -> None:
    """Make draw_inputs put an inf into x0 of `samples` from step `from_step` on (a non-finite tangent)."""
    draw = tr.draw_inputs

    def poisoned(b, gen, spec, step, images, device, world=None):
        inp = draw(b, gen, spec, step, images, device, world)
        if step >= from_step:
            inp.x0[samples, 0, 0, 0] = float("inf")
        return inp

    monkeypatch.setattr(tr, "draw_inputs", poisoned)


def test_nonfinite_samples_are_warned_once_and_counted(tmp_path: Path, shard_root: Path, monkeypatch, capsys):
    _poison_inputs(monkeypatch, slice(0, 1))
    run = tmp_path / "run"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 48))
    err = capsys.readouterr().err  # warnings go to stderr, beside the progress lines
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step 1: 1 of 16 samples" in warnings[0] and "nonfinite" in warnings[0], err
    recs = step_records(run)
    assert sorted(recs) == [1, 2, 3]
    assert all(r["nonfinite"] == 1 and r["skipped"] == 0 and math.isfinite(r["loss"]) for r in recs.values())
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert ck.step == 3 and all(torch.isfinite(v).all() for v in [*ck.net.values(), *ck.ema.values()])


def test_all_nonfinite_batches_stop_the_run_and_keep_the_checkpoint(tmp_path: Path, shard_root: Path, monkeypatch, capsys):
    run = tmp_path / "run"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 16))
    ckpt = run / "ckpt.safetensors"
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    capsys.readouterr()
    _poison_inputs(monkeypatch, slice(None))
    with pytest.raises(SystemExit) as e:  # the checkpoint is due at the end (image 320): never reached
        train_main("digits_sct.py", *tiny_args(shard_root, run, 320), "--resume")
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not PROGRESS_LINE.fullmatch(ln)]
    assert len(err) == 2 and err[0].startswith("warning: step 2: 16 of 16 samples"), err  # the warning, then one error line
    err = err[1:]
    assert err[0].startswith("error: ") and "10 consecutive steps" in err[0], err
    assert "non-finite" in err[0] and str(ckpt) in err[0]
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before
    recs = step_records(run)
    assert [recs[s]["nonfinite"] for s in range(2, 11)] == [16] * 9 and recs[2]["loss"] is None
    assert all(recs[s]["skipped"] == 1 for s in range(2, 11))


def test_no_checkpoint_of_nonfinite_weights(tmp_path: Path, shard_root: Path):
    a = cli.parse_args([str(SPECS / "digits_sct.py"), *tiny_args(shard_root, tmp_path / "run", 16)])
    spec, out = a.spec, a.out
    out.mkdir(parents=True)
    run = tr.Run(spec, out, resume=False)
    with torch.no_grad():
        run.model.net.conv_out.bias.fill_(float("nan"))
    with pytest.raises(UserError, match="not finite"):
        run.save()
    assert not (out / "ckpt.safetensors").exists()


def test_cli_diverging_run_stops_with_one_line(tmp_path: Path, shard_root: Path):
    """lr = 1e38 (finite: inf is refused up front): the first update makes the weights blow up, the loss is not
    finite from then on; stop after NONFINITE_PATIENCE steps with one line, no checkpoint."""
    run = tmp_path / "run"
    res = run_cli("scm_graph.train", SPECS / "digits_sct.py", *tiny_args(shard_root, run, 320), "--optim.lr", "1e38",
                  "--train.progress", "off", *PAPER_SCT, cwd=tmp_path)  # w_phi's exp(w) overflows; GroupNorm alone keeps F finite
    assert assert_user_error(res) == ("error: the loss or gradient norm was not finite for 10 consecutive steps (up to step 11); "
                                      "training stopped, no checkpoint was written")
    assert not (run / "ckpt.safetensors").exists()


def test_time_limit_then_resume(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    train_main("digits_diffusion.py", *tiny_args(shard_root, run, 64), "--train.time_limit_s", "1e-6")
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert (ck.step, ck.images) == (1, 16)  # stopped (and checkpointed) after the first step
    end = read_metrics(run)[-1]
    assert (end["event"], end["images"], end["step"]) == ("end", 16, 1)
    train_main("digits_diffusion.py", *tiny_args(shard_root, run, 64), "--resume")
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert (ck.step, ck.images) == (4, 64)
    assert sorted(step_records(run)) == [1, 2, 3, 4]


def test_truncate_metrics(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    tr.truncate_metrics(p, 10)  # no file: nothing to do
    assert not p.exists()
    recs = [{"event": "start", "images": 0}, {"images": 16, "loss": 1.0}, {"images": 32, "loss": 2.0},
            {"event": "eval", "images": 32, "fd_1step": 3.0}, {"images": 48, "loss": 4.0}, {"event": "x"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    tr.truncate_metrics(p, 32)
    assert [json.loads(ln) for ln in p.read_text().splitlines()] == recs[:4] + [recs[5]]
    assert p.read_text().endswith("\n") and list(tmp_path.iterdir()) == [p]  # no temp file left
    tr.truncate_metrics(p, 0)
    assert [json.loads(ln) for ln in p.read_text().splitlines()] == [recs[0], recs[5]]


def test_truncate_metrics_torn_last_line(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"images": 16, "loss": 1.0}) + "\n" + '{"images": 32, "lo')
    tr.truncate_metrics(p, 16)
    assert [json.loads(ln) for ln in p.read_text().splitlines()] == [{"images": 16, "loss": 1.0}]


def test_meter_buckets_and_extremes():
    m = tr.Meter(torch.device("cpu"))
    t = torch.tensor([0.1, 0.1, 0.5, 1.5])
    for k in range(2):
        out = StepOut(loss=torch.tensor(1.0 + k), mse=torch.tensor([1.0, 3.0, 5.0, 7.0]) * (k + 1),
                      w=torch.tensor([0.0, -1.0, 2.0, 0.5]) * (k + 1), tangent_norm=torch.ones(4) * k,
                      grad_norm=torch.tensor(2.0 * k), nonfinite=torch.zeros(4, dtype=torch.bool),
                      n_nonfinite=0, skipped=False)
        m.add(out, t)
    rec = m.flush()
    assert rec["loss"] == 1.5 and rec["grad_norm"] == 1.0 and rec["tangent_norm"] == 0.5
    assert rec["mse"] == pytest.approx((4.0 + 8.0) / 2)
    assert (rec["w_min"], rec["w_max"]) == (-2.0, 4.0)
    assert rec["mse_by_t"] == {"0.0-0.2": 3.0, "0.4-0.6": 7.5, "1.2-1.6": 10.5}
    assert (rec["nonfinite"], rec["skipped"]) == (0, 0)
    assert m.n == 0 and m.sums == {}


def test_meter_leaves_out_masked_samples_and_skipped_losses():
    m = tr.Meter(torch.device("cpu"))
    t = torch.tensor([0.1, 0.1, 0.5, 1.5])
    bad = torch.tensor([False, True, False, True])
    m.add(StepOut(loss=torch.tensor(2.0), mse=torch.tensor([1.0, float("nan"), 5.0, 0.0]), w=torch.tensor([0.0, 9.0, 1.0, -9.0]),
                  tangent_norm=torch.tensor([1.0, 0.0, 3.0, 0.0]), grad_norm=torch.tensor(4.0), nonfinite=bad,
                  n_nonfinite=2, skipped=False), t)
    m.add(StepOut(loss=torch.tensor(float("nan")), mse=torch.full((4,), 3.0), w=torch.zeros(4), tangent_norm=torch.ones(4),
                  grad_norm=torch.tensor(float("inf")), nonfinite=torch.zeros(4, dtype=torch.bool), n_nonfinite=0,
                  skipped=True), t)
    rec = m.flush()
    assert (rec["loss"], rec["grad_norm"]) == (2.0, 4.0)  # the skipped step's NaN loss is left out
    assert rec["mse"] == pytest.approx((1 + 5 + 4 * 3) / 6) and rec["tangent_norm"] == pytest.approx(8 / 6)
    assert (rec["w_min"], rec["w_max"]) == (0.0, 1.0)
    assert rec["mse_by_t"] == {"0.0-0.2": round(7 / 3, 6), "0.4-0.6": 4.0, "1.2-1.6": 3.0}
    assert (rec["nonfinite"], rec["skipped"]) == (2, 1)
    json.dumps(rec, allow_nan=False)
    m.add(StepOut(loss=torch.tensor(float("nan")), mse=torch.zeros(4), w=torch.zeros(4), tangent_norm=torch.zeros(4),
                  grad_norm=torch.tensor(float("nan")), nonfinite=torch.ones(4, dtype=torch.bool), n_nonfinite=4,
                  skipped=True), t)
    rec = m.flush()  # nothing finite to average: nulls, not NaN
    assert rec["loss"] is None and rec["mse"] is None and rec["w_min"] is None and rec["mse_by_t"] == {}
    assert (rec["nonfinite"], rec["skipped"]) == (4, 1)
    json.dumps(rec, allow_nan=False)








# ----------------------------------------------------------------------------- init_from


def test_init_from_loads_teacher_weights(tmp_path: Path, shard_root: Path, diffusion_ckpt: Path):
    teacher = load_checkpoint(diffusion_ckpt)
    a = cli.parse_args([str(SPECS / "digits_sct.py"),
                        *tiny_args(shard_root, tmp_path / "x", 16, "--train.init_from", str(diffusion_ckpt))])
    spec, out, resume = a.spec, a.out, a.resume
    assert not resume and out == tmp_path / "x" and spec.train.init_from == str(diffusion_ckpt)
    run = tr.Run(spec, out, resume=False)
    own = dict(run.model.named_parameters())
    assert_tensors_identical({k: v.detach() for k, v in own.items()}, teacher.ema)
    assert_tensors_identical(run.ema.params, teacher.ema)
    assert all(v.data_ptr() != own[k].data_ptr() for k, v in run.ema.params.items())  # a copy, not aliased
    assert run.step_fn.params["net.conv_out.weight"] is own["net.conv_out.weight"]  # the step trains them

    scratch = tr.Run(dataclasses.replace(spec, train=dataclasses.replace(spec.train, init_from="")), out, False)
    differ = [k for k, v in scratch.model.named_parameters() if not torch.equal(v, teacher.ema[k])]
    assert len(differ) > len(own) // 2  # the test would notice an ignored init_from


def test_init_from_end_to_end(tmp_path: Path, shard_root: Path, diffusion_ckpt: Path):
    """With lr 0 the sCT run's weights after one step are exactly the teacher's EMA weights."""
    teacher = load_checkpoint(diffusion_ckpt)
    run = tmp_path / "sct"
    train_main("digits_sct.py", *tiny_args(shard_root, run, 16, "--train.init_from", str(diffusion_ckpt),
                                           "--optim.lr", "0"))
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert ck.step == 1
    assert_tensors_identical(ck.net, teacher.ema)
    for k, v in ck.ema.items():
        torch.testing.assert_close(v, teacher.ema[k], rtol=0, atol=1e-6)
    assert spec_from_json(ck.spec_json).train.init_from == str(diffusion_ckpt)


def test_init_from_mismatched_net(tmp_path: Path, shard_root: Path, diffusion_ckpt: Path, capsys):
    run = tmp_path / "wide"
    with pytest.raises(SystemExit) as e:
        train_main("digits_sct.py", *tiny_args(shard_root, run, 16, "--train.init_from", str(diffusion_ckpt),
                                               "--net.unet.channels", "16"))
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "init_from" in err[0], err
    assert not (run / "ckpt.safetensors").exists()


def test_init_from_another_time_scale(tmp_path: Path, shard_root: Path, diffusion_ckpt: Path):
    """The same weights with another c_noise(t) = s t are not the network they were: one line, before any work."""
    a = cli.parse_args([str(SPECS / "digits_sct.py"), *tiny_args(shard_root, tmp_path / "x", 16, "--train.init_from",
                                                               str(diffusion_ckpt), "--net.time_scale", "1000")])
    with pytest.raises(UserError) as e:
        tr.Run(a.spec, a.out, resume=False)
    assert str(e.value) == (f"train.init_from {diffusion_ckpt} was trained with net.time_scale 1, this run has 1000: "
                            "set net.time_scale 1")


def test_init_from_missing_file(tmp_path: Path, shard_root: Path):
    with pytest.raises(UserError, match="not found"):
        a = cli.parse_args([str(SPECS / "digits_sct.py"),
                            *tiny_args(shard_root, tmp_path / "r", 16, "--train.init_from", str(tmp_path / "no"))])
        tr.train(a.spec, a.out)





def test_resume_same_folder_other_spelling(tmp_path: Path, shard_root: Path, monkeypatch):
    run = tmp_path / "run"
    train_main("digits_diffusion.py", *tiny_args(shard_root, run, 16))
    monkeypatch.chdir(tmp_path)
    train_main("digits_diffusion.py", *tiny_args(shard_root, Path("run"), 32), "--resume")  # relative path now
    assert load_checkpoint(run / "ckpt.safetensors").images == 32


def test_fresh_run_does_not_append_to_stale_metrics(tmp_path: Path, shard_root: Path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [{"event": "start", "images": 0, "marker": "stale"}, {"images": 16, "step": 1, "loss": 9.0, "marker": "stale"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    before = (run / "metrics.jsonl").read_bytes()
    try:
        train_main("digits_diffusion.py", *tiny_args(shard_root, run, 16))
    except SystemExit as e:  # refusing with a one-line error is fine too
        assert e.code == 2 and (run / "metrics.jsonl").read_bytes() == before
        return
    recs = read_metrics(run)
    assert not any(r.get("marker") == "stale" for r in recs)
    assert [r.get("event") for r in recs].count("start") == 1




def test_meter_state_round_trip_is_exact():
    """A checkpoint between two metrics lines carries the Meter's sums; loading them gives the same line."""
    def out(seed: int) -> StepOut:
        g = torch.Generator().manual_seed(seed)
        n = 8
        bad = torch.rand(n, generator=g) < 0.25
        return StepOut(loss=torch.randn((), generator=g), grad_norm=torch.rand((), generator=g), mse=torch.rand(n, generator=g),
                       tangent_norm=torch.rand(n, generator=g), w=torch.randn(n, generator=g), nonfinite=bad,
                       skipped=False, n_nonfinite=int(bad.sum()), loss_scale_overflow=False)

    ts = [torch.rand(8, generator=torch.Generator().manual_seed(100 + i)) * (math.pi / 2) for i in range(4)]
    whole = tr.Meter(torch.device("cpu"))
    for i in range(4):
        whole.add(out(i), ts[i])
    first = tr.Meter(torch.device("cpu"))
    for i in range(2):
        first.add(out(i), ts[i])
    state = json.loads(json.dumps(first.state()))  # through the checkpoint's JSON
    second = tr.Meter(torch.device("cpu"))
    second.load(state)
    for i in range(2, 4):
        second.add(out(i), ts[i])
    assert second.flush() == whole.flush()
    empty = tr.Meter(torch.device("cpu"))
    empty.load(None)
    assert empty.n == 0 and empty.sums == {}


def test_resume_ignores_label_dropout_where_it_is_not_read():
    """label_dropout is read by class-conditional diffusion only: elsewhere a resumed spec may differ in it."""
    base = tiny_spec(class_conditional=True)
    def with_(kind: str, p: float, cond: bool = True):
        return dataclasses.replace(base, net=dataclasses.replace(base.net, class_conditional=cond),
                                   objective=dataclasses.replace(base.objective, kind=kind, label_dropout=p))
    tr.check_resumable(with_("sct", 0.0), with_("sct", 0.1), Path("c"))
    tr.check_resumable(with_("diffusion", 0.0, cond=False), with_("diffusion", 0.1, cond=False), Path("c"))
    with pytest.raises(UserError, match=r"objective.label_dropout differs from the checkpoint c \(0.0 vs 0.1\)"):
        tr.check_resumable(with_("diffusion", 0.0), with_("diffusion", 0.1), Path("c"))


def test_resume_may_change_eval_t_mid_but_not_time_scale():
    """train.eval_t_mid only changes how the run is evaluated (RESUMABLE); net.time_scale changes the network."""
    base = tiny_spec()
    t_mid = dataclasses.replace(base, train=dataclasses.replace(base.train, eval_t_mid=0.8))
    tr.check_resumable(base, t_mid, Path("c"))
    scaled = dataclasses.replace(base, net=dataclasses.replace(base.net, time_scale=1000.0))
    with pytest.raises(UserError, match=r"--resume: net.time_scale differs from the checkpoint c \(1.0 vs 1000.0\)"):
        tr.check_resumable(base, scaled, Path("c"))


def test_resume_keeps_icts_curriculum():
    """iCT's N(k) is laid out over train.total_images: a resume may not change it (sCT runs may be extended)."""
    base = tiny_spec()
    def with_(kind: str, images: int):
        return dataclasses.replace(base, objective=dataclasses.replace(base.objective, kind=kind),
                                   train=dataclasses.replace(base.train, total_images=images))
    tr.check_resumable(with_("sct", 64_000), with_("sct", 128_000), Path("c"))
    tr.check_resumable(with_("ict", 64_000), with_("ict", 64_000), Path("c"))
    with pytest.raises(UserError, match=r"iCT's curriculum .* cannot change from 64000 \(checkpoint c\) to 128000"):
        tr.check_resumable(with_("ict", 64_000), with_("ict", 128_000), Path("c"))


@pytest.mark.parametrize(("poisoned_step", "total", "skips"), [(2, 96, [1, 0]), (1, 32, [1])])
def test_updates_decided_on_the_device_give_the_hosts_run(tmp_path: Path, shard_root: Path, monkeypatch,
                                                          poisoned_step: int, total: int, skips: list[int]):
    """The accelerators' way, forced on the CPU: every update guarded on the device, RAdam's step counts taken back
    after the fact, the step's report read every few steps. With every sample of one step poisoned (that update
    skipped) and checkpoints between metrics lines, the run's checkpoint and metrics equal the host's: with the
    skip in the middle of the run, and as the last step before a checkpoint (its counts taken back before saving)."""
    from scm_graph.train.step import TrainStep

    real_draw = tr.draw_inputs

    def poisoned(b, gen, spec, step, *args, **kw):
        inp = real_draw(b, gen, spec, step, *args, **kw)
        if step == poisoned_step:
            inp.x0.fill_(float("nan"))
        return inp

    class OnTheDevice(TrainStep):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw, device_skip=True)
            self.update.lag_counters = True

    monkeypatch.setattr(tr, "draw_inputs", poisoned)
    extra = ("--train.log_every_images", "48", "--train.ckpt_every_images", "32")
    train_main("digits_sct.py", *tiny_args(shard_root, tmp_path / "host", total, *extra))
    monkeypatch.setattr(tr, "TrainStep", OnTheDevice)
    train_main("digits_sct.py", *tiny_args(shard_root, tmp_path / "device", total, *extra))
    host, dev = (load_checkpoint(tmp_path / r / "ckpt.safetensors") for r in ("host", "device"))
    assert_tensors_identical(host.net, dev.net)
    assert_tensors_identical(host.ema, dev.ema)
    assert host.optim["state"].keys() == dev.optim["state"].keys()
    for i in host.optim["state"]:
        assert_tensors_identical(host.optim["state"][i], dev.optim["state"][i])
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s", "spec")} for r in recs]
    h, d = strip(read_metrics(tmp_path / "host")), strip(read_metrics(tmp_path / "device"))
    assert h == d and [r["skipped"] for r in h if "skipped" in r] == skips
