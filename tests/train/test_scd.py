"""sCD runs end to end: the student starts as its teacher, the teacher stays out of the student's state,
guided sampling of the student, and one line for each teacher that cannot teach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import scm_graph.sample.cli as sample_cli
from scm_graph.checkpoint import load_checkpoint
from scm_graph.sample.generate import generate, load_generator
from tests.helpers import SPECS, assert_user_error, read_metrics, run_cli, tiny_args, train_tiny

pytestmark = pytest.mark.usefixtures("torch_defaults", "scm_cache")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shard_root: Path, scm_cache) -> Path:
    """A tiny class-conditional digits diffusion teacher with label dropout (specs/digits_teacher.py)."""
    return train_tiny("digits_teacher.py", shard_root, tmp_path_factory.mktemp("run") / "teacher", 32)


def _scd(shard_root: Path, out: Path, teacher: Path, total: int = 16, *extra: str) -> list[str]:
    return [str(SPECS / "digits_scd.py"), *tiny_args(shard_root, out, total, "--objective.teacher", str(teacher), *extra)]


def test_student_starts_as_the_teacher_and_keeps_only_its_own_state(tmp_path: Path, shard_root: Path, teacher: Path):
    """lr 0: after a step the student's weights are the teacher's EMA weights, its guidance input zero; the
    checkpoint holds the student only, and at s = 1 the student's samples depend on s only through that input."""
    t = load_checkpoint(teacher)
    ckpt = train_tiny("digits_scd.py", shard_root, tmp_path / "scd", 16, "--objective.teacher", str(teacher), "--optim.lr", "0")
    s = load_checkpoint(ckpt)
    guidance = {k for k in s.net if k.startswith("net.emb.guidance.")}
    assert guidance and set(s.net) == set(t.ema) | guidance and set(s.ema) == set(s.net)
    for k, v in t.ema.items():
        assert torch.equal(s.net[k], v), k
    assert all(torch.count_nonzero(s.net[k]) == 0 for k in guidance)
    assert len(s.optim["state"]) == len(s.net)  # the optimiser holds the student's parameters only
    g = load_generator(ckpt, device="cpu")
    assert g.model.takes_guidance
    a = generate(g, 8, steps=2, seed=0, guidance=1.0)
    b = generate(g, 8, steps=2, seed=0, guidance=2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the zero-initialised input: s changes nothing yet


def test_student_trains_and_samples_with_guidance(tmp_path: Path, shard_root: Path, teacher: Path):
    # Adam moves every weight by about lr at once (RAdam's first steps barely move the zero-initialised input)
    ckpt = train_tiny("digits_scd.py", shard_root, tmp_path / "scd", 48, "--objective.teacher", str(teacher),
                      "--optim.kind", "adam", "--optim.lr", "0.01")
    s = load_checkpoint(ckpt)
    assert s.step == 3 and any(torch.count_nonzero(v) for k, v in s.net.items() if k.startswith("net.emb.guidance."))
    lines = [r for r in read_metrics(tmp_path / "scd") if "loss" in r and "event" not in r]
    assert len(lines) == 3 and all(0 < r["teacher_share"] <= 1 for r in lines)  # the teacher's share of each step
    out = tmp_path / "g"
    for scale in ("1", "2"):
        sample_cli.main(["--ckpt", str(ckpt), "--steps", "2", "--n", "4", "--label", "3", "--guidance", scale,
                         "--out", str(out / f"{scale}.png"), "--npz", str(out / f"{scale}.npz")])
    import numpy as np

    with np.load(out / "1.npz") as a, np.load(out / "2.npz") as b:
        assert not np.array_equal(a["x"], b["x"])  # the trained guidance input changes the samples


@pytest.mark.parametrize("case", ["missing", "shape", "unconditional", "no_label_dropout", "not_diffusion", "no_teacher"])
def test_teachers_that_cannot_teach_are_one_line(tmp_path: Path, shard_root: Path, teacher: Path, case: str):
    out = tmp_path / "scd"
    if case == "missing":
        args, want = _scd(shard_root, out, tmp_path / "nope.safetensors"), f"checkpoint {tmp_path / 'nope.safetensors'} not found"
    elif case == "shape":
        cifar = train_tiny("cifar10_diffusion.py", shard_root, tmp_path / "cifar", 16, "--data.name", "cifar10", "--data.workers", "0")
        args = _scd(shard_root, out, cifar, 16, "--net.class_conditional", "false")
        want = f"objective.teacher {cifar} models 3x32x32 data, the student's shards hold 1x8x8"
    elif case == "unconditional":
        plain = train_tiny("digits_diffusion.py", shard_root, tmp_path / "plain", 16)
        args = _scd(shard_root, out, plain)
        want = (f"objective.teacher {plain} is unconditional; a class-conditional student (guidance distillation) needs a "
                "class-conditional teacher")
    elif case == "no_label_dropout":
        nodrop = train_tiny("digits_teacher.py", shard_root, tmp_path / "nodrop", 16, "--objective.label_dropout", "0")
        args = _scd(shard_root, out, nodrop)
        want = (f"objective.teacher {nodrop} was trained without label dropout, so it has no unconditional velocity for "
                "guidance; set objective.guidance 1 1 or use a teacher trained with label dropout")
    elif case == "not_diffusion":
        sct = train_tiny("digits_sct.py", shard_root, tmp_path / "sct", 16, "--net.class_conditional", "true")
        args, want = _scd(shard_root, out, sct), f"objective.teacher {sct} is a 'sct' model; sCD distils a diffusion teacher"
    else:
        args = [str(SPECS / "digits_scd.py"), *tiny_args(shard_root, out, 16, "--objective.teacher", "")]
        want = "objective.kind 'scd' needs a teacher: set objective.teacher to its checkpoint"
    assert assert_user_error(run_cli("scm_graph.train", *args)) == f"error: {want}"
    assert not out.exists()


def test_a_student_from_the_teachers_weights_needs_its_time_scale():
    """The student's weights start as the teacher's: with another net.time_scale they would see another time
    input (one line); a student trained from scratch may differ."""
    import dataclasses

    from scm_graph.specfile import read_spec_file
    from scm_graph.train.distill import check_teacher
    from tests.helpers import one_line_error

    t, s = read_spec_file(SPECS / "digits_teacher.py"), read_spec_file(SPECS / "digits_scd.py")
    check_teacher(t, s, "T")
    s = dataclasses.replace(s, net=dataclasses.replace(s.net, time_scale=1000.0))
    assert one_line_error(check_teacher, t, s, "T") == (
        "objective.teacher T has net.time_scale 1, the student 1000: a student that starts from the teacher's "
        "weights needs the teacher's (or --objective.init_from_teacher false)")
    check_teacher(t, dataclasses.replace(s, objective=dataclasses.replace(s.objective, init_from_teacher=False)), "T")


EDM_FACTORY = '''
import torch
from scm_graph.teacher import EDMPrecond


class Net(torch.nn.Module):
    """A raw EDM-style network F_edm(c_in x, c_noise): one conv with a noise-level bias."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.noise = torch.nn.Linear(1, 1)

    def forward(self, x, c_noise, labels):
        return self.conv(x) + self.noise(c_noise[:, None])[:, :, None, None]


def make():
    return EDMPrecond(Net(), sigma_d=0.5)
'''


def test_an_edm_teacher_through_the_factory_hook(tmp_path: Path, shard_root: Path):
    """teacher_kind 'edm': the user's denoiser module with safetensors weights distils into an unconditional
    student trained from scratch; its weights stay out of the student's checkpoint."""
    import safetensors.torch

    (tmp_path / "my_teacher.py").write_text(EDM_FACTORY)
    torch.manual_seed(0)
    conv, lin = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Linear(1, 1)
    weights = {"net.conv.weight": conv.weight.detach(), "net.conv.bias": conv.bias.detach(),
               "net.noise.weight": lin.weight.detach(), "net.noise.bias": lin.bias.detach()}
    safetensors.torch.save_file(weights, str(tmp_path / "edm.safetensors"))
    ckpt = train_tiny("digits_scd.py", shard_root, tmp_path / "scd", 32, "--objective.teacher", str(tmp_path / "edm.safetensors"),
                      "--objective.teacher_kind", "edm", "--objective.teacher_factory", f"{tmp_path / 'my_teacher.py'}:make",
                      "--objective.init_from_teacher", "false", "--net.class_conditional", "false")
    s = load_checkpoint(ckpt)
    assert s.step == 2 and not any(k.startswith(("net.conv.", "net.noise.")) for k in s.net)
    assert all(torch.isfinite(v).all() for v in s.net.values())
    bad = run_cli("scm_graph.train", *_scd(shard_root, tmp_path / "bad", tmp_path / "edm.safetensors", 16,
                                           "--objective.teacher_kind", "edm", "--net.class_conditional", "false"))
    assert assert_user_error(bad) == ("error: objective.teacher_kind 'edm' needs objective.teacher_factory "
                                      "('file.py:function' building the denoiser)")
    bad = run_cli("scm_graph.train", *_scd(shard_root, tmp_path / "bad", tmp_path / "edm.safetensors", 16,
                                           "--objective.teacher_kind", "edm", "--objective.teacher_factory",
                                           f"{tmp_path / 'my_teacher.py'}:make", "--net.class_conditional", "false"))
    assert assert_user_error(bad) == ("error: an 'edm' teacher's network is not the student's: set objective.init_from_teacher "
                                      "false (or train.init_from a checkpoint of the student's network)")
    assert not (tmp_path / "bad").exists()
