"""`python -m scm_graph.diagnose`: the tangent's terms add up to the objective's tangent (float64), the
normalised tangent's norm is ||g|| / (||g|| + c), the loss is the objective's, and the CLI writes a JSON
whose numbers are a recomputation's and the ones plotted; bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from scm_graph import diagnose as dg
from scm_graph import trigflow
from scm_graph.objectives.sct import (
    consistency_loss,
    consistency_prepare,
    sct_velocity,
    tangent,
)
from scm_graph.spec import ObjectiveSpec
from tests.helpers import PAPER_SCT, assert_user_error, run_cli, train_tiny
from tests.objectives.shared import SD, _inputs


@pytest.mark.parametrize("r,clip", [(1.0, False), (0.3, False), (1.0, True)])
def test_terms_add_up_to_the_objectives_tangent(tiny_model64, r: float, clip: bool):
    m = tiny_model64
    params = dict(m.named_parameters())
    cfg = ObjectiveSpec(sigma_d=SD, tangent_c=0.1, tangent_clip=clip)
    inp = _inputs(r=r)
    out = dg.tangent_terms(m, params, inp, cfg, sct_velocity)
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    _, g = tangent(m, params, inp, x_t, trigflow.velocity(inp.x0, inp.z, inp.t), cfg)
    total = out.terms["velocity"] + out.terms["x_t"] + out.terms["dF"]
    torch.testing.assert_close(total, g, rtol=1e-12, atol=1e-14)  # the three terms make the objective's g
    torch.testing.assert_close(out.g, g, rtol=0, atol=0)
    assert all(v.abs().amax() > 0 for v in out.terms.values())
    norm = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(out.g_norm, norm, rtol=0, atol=0)
    if clip:
        torch.testing.assert_close(out.g_normalized, g.clamp(-1, 1), rtol=0, atol=0)
    else:
        torch.testing.assert_close(out.g_normalized.flatten(1).norm(dim=1), norm / (norm + 0.1), rtol=1e-12, atol=0)
    prep = consistency_prepare(m, params, inp, cfg, sct_velocity)  # the objective's own pass gives the same numbers
    torch.testing.assert_close(out.g_normalized, prep.g, rtol=0, atol=0)
    ref = consistency_loss(m, params, inp, cfg, sct_velocity)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.mse, ref.mse, rtol=0, atol=0)
    torch.testing.assert_close(out.w, ref.w, rtol=0, atol=0)


def test_term_signs_follow_algorithm_1(tiny_model64):
    """Each term against its formula written out: -cos^2 t (sigma_d F - v), -r cos t sin t x_t, -r sigma_d cos t sin t dF/dt."""
    m = tiny_model64
    params = dict(m.named_parameters())
    inp = _inputs(r=0.7)
    out = dg.tangent_terms(m, params, inp, ObjectiveSpec(sigma_d=SD), sct_velocity)
    x_t, v = trigflow.noisy(inp.x0, inp.z, inp.t), trigflow.velocity(inp.x0, inp.z, inp.t)
    fn = lambda x, t: m(x, t, inp.labels)
    F, dFdt = torch.func.jvp(fn, (x_t, inp.t), (v, torch.ones_like(inp.t)))
    c, s = (trigflow.expand(f(inp.t), x_t) for f in (torch.cos, torch.sin))
    torch.testing.assert_close(out.terms["velocity"], -c**2 * (SD * F - v))
    torch.testing.assert_close(out.terms["x_t"], -0.7 * c * s * x_t)
    torch.testing.assert_close(out.terms["dF"], -0.7 * SD * c * s * dFdt)


def test_report_is_the_batch_mean_over_times(tiny_model64):
    """diagnose() per t: the batch means of the per-sample RMS, in chunks of `batch`, the loss the objective's."""
    m = tiny_model64.eval()
    cfg = ObjectiveSpec(sigma_d=SD)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) * SD
    z = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) * SD
    labels = torch.arange(5)
    times = dg.time_grid(3, "uniform", cfg)
    assert times == pytest.approx([math.pi / 12, math.pi / 4, 5 * math.pi / 12])
    res = dg.diagnose(m, cfg, x0, z, labels, None, times, 0.5, sct_velocity, batch=2)
    params = dict(m.named_parameters())
    for i, t in enumerate(times):
        inp = dataclasses.replace(_inputs(), x0=x0, z=z, t=torch.full((5,), t, dtype=torch.float64), labels=labels,
                                  dropout_key=torch.tensor(0), r=torch.tensor(0.5))
        out = dg.tangent_terms(m, params, inp, cfg, sct_velocity)
        for k in dg.TERMS:
            want = (out.terms[k].flatten(1).norm(dim=1) / 8).mean().item()
            assert res["rms"][k][i] == pytest.approx(want, rel=1e-12)
        assert res["norm"]["g"][i] == pytest.approx(out.g_norm.mean().item(), rel=1e-12)
        assert res["norm"]["g_normalized"][i] == pytest.approx((out.g_norm / (out.g_norm + 0.1)).mean().item(), rel=1e-12)
        assert res["loss"][i] == pytest.approx(out.loss.item(), rel=1e-12)
        assert res["w"][i] == pytest.approx(out.w.mean().item(), rel=1e-12)
        assert res["nonfinite"][i] == 0


def test_proposal_grid_is_the_proposals_quantiles():
    cfg = ObjectiveSpec(sigma_d=0.5, P_mean=-1.0, P_std=1.4)
    ts = dg.time_grid(4, "proposal", cfg)
    tau = (torch.tensor(ts, dtype=torch.float64).tan() * 0.5).log()  # t -> sigma / sigma_d -> tau
    cdf = 0.5 * (1 + torch.erf((tau + 1.0) / (1.4 * math.sqrt(2))))
    torch.testing.assert_close(cdf, torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))


@pytest.fixture(scope="module")
def aw_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny digits sCT run with adaptive weighting on (the paper's settings), so w_phi(t) is reported."""
    return train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "sct_aw", 64, *PAPER_SCT)


def test_cli_writes_json_and_png_of_the_same_numbers(aw_ckpt: Path, shard_root: Path, tmp_path: Path, torch_defaults, capsys):
    sct_ckpt = aw_ckpt
    out, js = tmp_path / "d" / "diag.png", tmp_path / "d" / "diag.json"
    dg.main(["--ckpt", str(sct_ckpt), "--times", "3", "--n", "12", "--batch", "5", "--r", "1", "--data-root", str(shard_root),
             "--out", str(out), "--out-json", str(js), "--progress", "off", "--device", "cpu"])
    assert "wrote" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(js.read_text())
    assert rep["objective"] == "sct" and rep["r"] == 1.0 and rep["n"] == 12 and len(rep["t"]) == 3
    # a recomputation from the same checkpoint and data gives the JSON's numbers
    from scm_graph.sample.generate import load_generator

    gen = load_generator(sct_ckpt, device="cpu")
    x0, labels = dg.real_batch(gen.spec, str(shard_root), 12, 0)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)) * gen.sigma_d
    res = dg.diagnose(gen.model, gen.spec.objective, x0, z, labels, None, rep["t"], 1.0, sct_velocity, batch=5)
    for k in ("rms", "norm"):
        for name, ys in res[k].items():
            assert rep[k][name] == pytest.approx(ys, rel=1e-6), (k, name)
    assert rep["loss"] == pytest.approx(res["loss"], rel=1e-6) and rep["w"] == pytest.approx(res["w"], rel=1e-6)
    # the plot draws exactly the JSON's numbers
    fig = dg.figure(rep)
    top, bottom = fig.axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    for k in (*dg.TERMS, "g", "g_normalized"):
        assert drawn[dg.TERM_LABELS[k]] == rep["rms"][k]
    assert top.get_yscale() == "log"
    assert [list(line.get_ydata()) for line in bottom.get_lines()] == [rep["loss"], rep["w"]]


def test_default_outputs_go_beside_the_checkpoint(sct_ckpt: Path, shard_root: Path, tmp_path: Path, torch_defaults):
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(sct_ckpt.read_bytes())
    dg.main(["--ckpt", str(ckpt), "--times", "2", "--n", "4", "--data-root", str(shard_root), "--progress", "off",
             "--device", "cpu", "--grid", "proposal"])
    assert (ckpt.parent / "diagnose.png").is_file()
    rep = json.loads((ckpt.parent / "diagnose.json").read_text())
    assert rep["grid"] == "proposal" and 0 < rep["r"] < 1  # the checkpoint's warmup ratio (images / warmup_images)


def test_missing_checkpoint_is_one_line(tmp_path: Path):
    res = run_cli("scm_graph.diagnose", "--ckpt", tmp_path / "nope" / "ckpt.safetensors")
    assert_user_error(res, "not found")
    assert not (tmp_path / "nope").exists()  # no output folder made for it


@pytest.mark.parametrize("case", ["corrupt", "times", "out", "r"])
def test_bad_input_is_one_line(case: str, sct_ckpt: Path, tmp_path: Path, capsys):
    ckpt, extra = str(sct_ckpt), []
    if case == "corrupt":
        bad = tmp_path / "ckpt.safetensors"
        bad.write_bytes(b"\x00garbage" * 10)
        ckpt, needle = str(bad), "not a safetensors file"
    elif case == "times":
        extra, needle = ["--times", "0"], "--times must be at least 1"
    elif case == "out":
        (tmp_path / "file").write_text("x")
        extra, needle = ["--out", str(tmp_path / "file" / "d.png")], "--out"
    else:
        extra, needle = ["--r", "2"], "--r must lie in [0, 1]"
    with pytest.raises(SystemExit) as e:
        dg.main(["--ckpt", ckpt, "--out-json", str(tmp_path / "d.json"), *extra])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "d.json").exists()


def test_diffusion_checkpoint_is_refused(diffusion_ckpt: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        dg.main(["--ckpt", str(diffusion_ckpt), "--out", str(tmp_path / "d.png"), "--out-json", str(tmp_path / "d.json")])
    assert "diagnose needs a TrigFlow consistency model (sct, scd or discrete)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scd_run(tmp_path_factory, shard_root: Path, scm_cache) -> tuple[Path, Path]:
    """A tiny guidance-distilled digits sCD student (one step) and its tiny class-conditional teacher."""
    from tests.helpers import TorchDefaults, train_tiny

    root = tmp_path_factory.mktemp("run")
    with TorchDefaults():
        teacher = train_tiny("digits_teacher.py", shard_root, root / "teacher", 16)
        student = train_tiny("digits_scd.py", shard_root, root / "scd", 16, "--objective.teacher", str(teacher))
    return student, teacher


def test_scd_takes_dx_dt_from_its_guided_teacher(scd_run, shard_root: Path, tmp_path: Path, torch_defaults):
    """The velocity term is -cos^2 t (sigma_d F^- - sigma_d (F_u + s (F_c - F_u))) with the teacher's F_c, F_u and
    the student's CFG scales s ~ U[1, 2] drawn after the noise."""
    from scm_graph.sample.generate import load_generator
    from scm_graph.train.distill import load_teacher

    ckpt, _ = scd_run
    js = tmp_path / "d.json"
    dg.main(["--ckpt", str(ckpt), "--times", "2", "--n", "6", "--r", "1", "--data-root", str(shard_root),
             "--out", str(tmp_path / "d.png"), "--out-json", str(js), "--progress", "off", "--device", "cpu"])
    rep = json.loads(js.read_text())
    assert rep["objective"] == "scd"
    gen = load_generator(ckpt, device="cpu")
    spec = gen.spec
    teacher = load_teacher(spec, torch.device("cpu")).module
    x0, labels = dg.real_batch(spec, str(shard_root), 6, 0)
    assert labels is not None
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(x0.shape, generator=rng) * SD
    s = 1.0 + torch.rand(6, generator=rng)
    with torch.no_grad():
        for i, t in enumerate(rep["t"]):
            tt = torch.full((6,), t)
            x_t = trigflow.noisy(x0, z, tt)
            F_c, F_u = teacher(x_t, tt, labels), teacher(x_t, tt, torch.full_like(labels, -1))
            v = SD * (F_u + trigflow.expand(s, F_c) * (F_c - F_u))
            F = gen.model(x_t, tt, labels, None, s)
            want = (-(math.cos(t) ** 2) * (SD * F - v)).flatten(1).norm(dim=1) / 8
            assert rep["rms"]["velocity"][i] == pytest.approx(want.mean().item(), rel=1e-5)


def test_scd_without_its_teacher_is_one_line(scd_run, tmp_path: Path, capsys):
    ckpt, _ = scd_run
    with pytest.raises(SystemExit) as e:
        dg.main(["--ckpt", str(ckpt), "--teacher", str(tmp_path / "gone.safetensors"), "--out", str(tmp_path / "d.png"),
                 "--out-json", str(tmp_path / "d.json"), "--device", "cpu"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "gone.safetensors (--teacher), is not a file" in lines[0], lines
