"""The sampling CLI on tiny trained checkpoints: options, seeds, EMA vs raw weights, labels, one-line errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import scm_graph.sample.cli as cli
from scm_graph.checkpoint import load_checkpoint
from scm_graph.sample.generate import generate, load_generator, to_uint8
from tests.helpers import assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_defaults")

T_MAX = math.atan(80 / 0.5)


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_cli_subprocess_one_step(tmp_path: Path, sct_ckpt: Path):
    res = run_cli("scm_graph.sample", "--ckpt", sct_ckpt, "--steps", "1", "--n", "16", "--out", "g.png",
                  cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "g.png" in res.stdout and res.stderr == ""
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (4 * 68 + 4, 4 * 68 + 4) and im.mode == "L"  # 16 images, 4 per row, 8 px -> 64 px, 4 px pad


def test_cli_consistency_options(tmp_path: Path, sct_ckpt: Path):
    out = {}
    for name, args in {"s1": ["--steps", "1"], "s2": ["--steps", "2"], "t2": ["--times", repr(T_MAX), "1.1"],
                       "t3": ["--times", "1.5", "1.1", "0.6"]}.items():
        cli.main(["--ckpt", str(sct_ckpt), "--n", "16", "--out", str(tmp_path / f"{name}.png"),
                 "--npz", str(tmp_path / f"{name}.npz"), *args])
        assert (tmp_path / f"{name}.png").is_file()
        out[name] = _npz(tmp_path / f"{name}.npz")
    g = load_generator(sct_ckpt)
    for d in out.values():
        assert d["samples"].dtype == np.uint8 and d["samples"].shape == (16, 1, 8, 8)
        assert d["x"].dtype == np.float32 and d["x"].shape == (16, 1, 8, 8)
        assert np.array_equal(d["samples"], to_uint8(torch.from_numpy(d["x"]), g.spec).numpy())
    assert np.array_equal(out["s2"]["x"], out["t2"]["x"])  # --steps 2 == times [t_max, 1.1]
    assert not np.array_equal(out["s1"]["x"], out["s2"]["x"])
    assert not np.array_equal(out["t3"]["x"], out["s2"]["x"])
    # the CLI is generate() on the EMA weights
    assert np.array_equal(out["t3"]["x"], generate(g, 16, times=[1.5, 1.1, 0.6], seed=0).numpy())


def test_cli_seed_and_raw(tmp_path: Path, sct_ckpt: Path):
    def npz(name, *args):
        cli.main(["--ckpt", str(sct_ckpt), "--n", "8", "--out", str(tmp_path / f"{name}.png"),
                 "--npz", str(tmp_path / f"{name}.npz"), *args])
        return _npz(tmp_path / f"{name}.npz")

    a, b, c = npz("a", "--seed", "7"), npz("b", "--seed", "7"), npz("c", "--seed", "8")
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["samples"], b["samples"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert not np.array_equal(a["x"], c["x"])
    ck = load_checkpoint(sct_ckpt)
    assert any(not torch.equal(ck.net[k], ck.ema[k]) for k in ck.net)  # EMA lags the weights
    raw = npz("raw", "--seed", "7", "--raw")
    assert not np.array_equal(raw["x"], a["x"])
    assert np.array_equal(raw["x"], generate(load_generator(sct_ckpt, ema=False), 8, steps=2, seed=7).numpy())


def test_cli_diffusion_solvers(tmp_path: Path, diffusion_ckpt: Path):
    res = {}
    for solver in ("euler", "heun"):
        cli.main(["--ckpt", str(diffusion_ckpt), "--solver", solver, "--steps", "4", "--n", "8",
                 "--out", str(tmp_path / f"{solver}.png"), "--npz", str(tmp_path / f"{solver}.npz")])
        res[solver] = _npz(tmp_path / f"{solver}.npz")
        assert res[solver]["samples"].shape == (8, 1, 8, 8) and np.isfinite(res[solver]["x"]).all()
        with Image.open(tmp_path / f"{solver}.png") as im:
            assert im.size == (3 * 68 + 4, 3 * 68 + 4)
    assert not np.array_equal(res["euler"]["x"], res["heun"]["x"])
    g = load_generator(diffusion_ckpt)
    assert not g.is_consistency
    assert np.array_equal(res["heun"]["x"], generate(g, 8, steps=4, solver="heun").numpy())
    assert np.array_equal(res["euler"]["x"], generate(g, 8, steps=4, solver="euler").numpy())


# ----------------------------------------------------------------------------- CLI bad input


def test_cli_missing_ckpt(tmp_path: Path):
    res = run_cli("scm_graph.sample", "--ckpt", tmp_path / "nope.safetensors", "--out", tmp_path / "g.png",
                  cwd=tmp_path, timeout=120)
    assert_user_error(res, "nope.safetensors", f"checkpoint {tmp_path / 'nope.safetensors'} not found")
    assert not (tmp_path / "g.png").exists()


def test_cli_not_safetensors(tmp_path: Path):
    p = tmp_path / "junk.safetensors"
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    mtime = p.stat().st_mtime_ns
    res = run_cli("scm_graph.sample", "--ckpt", p, "--out", tmp_path / "g.png", cwd=tmp_path, timeout=120)
    line = assert_user_error(res, "junk.safetensors", f"checkpoint {p} is not a safetensors file (")
    assert line.startswith(f"error: checkpoint {p} is not a safetensors file (") and line.endswith(")"), line
    assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert not (tmp_path / "g.png").exists()


def test_cli_safetensors_without_metadata(tmp_path: Path):
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(p))
    data = p.read_bytes()
    res = run_cli("scm_graph.sample", "--ckpt", p, "--out", tmp_path / "g.png", cwd=tmp_path, timeout=120)
    line = assert_user_error(res, "plain.safetensors", "metadata")
    assert line == f"error: checkpoint {p} has no scm_graph metadata", line
    assert p.read_bytes() == data and not (tmp_path / "g.png").exists()


def _main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_label_on_unconditional(tmp_path: Path, sct_ckpt: Path, capsys):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--label", "3", "--out", str(tmp_path / "g.png"))
    assert "unconditional" in msg and not (tmp_path / "g.png").exists()
    assert msg == "error: --label given but this model is unconditional"


@pytest.mark.parametrize("args,needle,message", [
    (["--n", "0"], "--n", "--n must be at least 1, not 0"),
    (["--n", "-4"], "--n", "--n must be at least 1, not -4"),
    (["--batch", "0"], "--batch", "--batch must be at least 1, not 0"),
    (["--times", "2.0"], "--times", "--times must lie in (0, pi/2], not 2.0"),
    (["--times", "1.0", "0"], "--times", "--times must lie in (0, pi/2], not 1.0 0.0"),
    (["--times", "1.0", "-0.5"], "--times", "--times must lie in (0, pi/2], not 1.0 -0.5"),
    (["--steps", "0"], "--steps", "--steps must be at least 1, not 0"),
])
def test_cli_bad_values(tmp_path: Path, sct_ckpt: Path, capsys, args, needle, message):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(tmp_path / "g.png"), *args)
    assert needle in msg and not (tmp_path / "g.png").exists()
    assert msg == f"error: {message}"


def test_cli_diffusion_steps_zero(tmp_path: Path, diffusion_ckpt: Path, capsys):
    msg = _main_error(capsys, "--ckpt", str(diffusion_ckpt), "--steps", "0", "--out", str(tmp_path / "g.png"))
    assert msg == "error: --steps must be at least 1, not 0" and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("times", [["0.6", "1.1", "1.5"], ["1.1", "1.1"]])
def test_cli_times_must_decrease(tmp_path: Path, sct_ckpt: Path, capsys, times):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(tmp_path / "g.png"), "--times", *times)
    assert "--times" in msg and not (tmp_path / "g.png").exists()
    assert msg == f"error: --times must strictly decrease, not {' '.join(str(float(t)) for t in times)}"


# ----------------------------------------------------------------------------- output paths, checked before any work


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling that fails the test: an output check must come before any work."""
    def boom(*a, **k):
        raise AssertionError("sampled before checking the output paths")
    monkeypatch.setattr(cli, "generate", boom)


@pytest.mark.parametrize("flags,message", [
    (["--out", "{d}/grid"], "--out {d}/grid: the file name must end in .png"),
    (["--out", "{d}/grid.jpg"], "--out {d}/grid.jpg: the file name must end in .png"),
    (["--out", "{d}"], "--out {d}: the file name must end in .png"),
    (["--out", "{d}/g.png", "--npz", "{d}/x"], "--npz {d}/x: the file name must end in .npz"),
    (["--out", "{d}/afile/g.png"], "--out {d}/afile: exists and is not a folder"),
    (["--out", "{d}/g.png", "--npz", "{d}/afile/x.npz"], "--npz {d}/afile: exists and is not a folder"),
    (["--out", "{d}/ro/g.png"], "--out {d}/ro: the folder is not writable"),
    (["--out", "{d}/ro/sub/g.png"], "--out: cannot create folder {d}/ro/sub: Permission denied"),
])
def test_cli_output_paths_checked_before_work(tmp_path: Path, sct_ckpt: Path, capsys, no_sampling, flags, message):
    if "/ro" in message and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        msg = _main_error(capsys, "--ckpt", str(sct_ckpt), *[f.format(d=tmp_path) for f in flags])
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert msg == "error: " + message.format(d=tmp_path)
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"]


def test_cli_creates_output_folders_and_writes_both_files(tmp_path: Path, sct_ckpt: Path):
    out, npz = tmp_path / "new" / "deeper" / "g.png", tmp_path / "other" / "x.npz"
    cli.main(["--ckpt", str(sct_ckpt), "--n", "4", "--steps", "1", "--out", str(out), "--npz", str(npz)])
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert _npz(npz)["samples"].shape == (4, 1, 8, 8)
    assert [p.name for p in out.parent.iterdir()] == ["g.png"] and [p.name for p in npz.parent.iterdir()] == ["x.npz"]


def test_cli_replaces_an_existing_grid_whole(tmp_path: Path, sct_ckpt: Path):
    out = tmp_path / "g.png"
    out.write_bytes(b"old")
    cli.main(["--ckpt", str(sct_ckpt), "--n", "4", "--steps", "1", "--out", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]  # no temp file left


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory, shard_root: Path, scm_cache) -> Path:
    """A class-conditional tiny digits sCT run (1 step)."""
    from tests.helpers import train_tiny

    return train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "cond", 16,
                       "--net.class_conditional", "true")


def test_cli_label_on_conditional(tmp_path: Path, cond_ckpt: Path):
    cli.main(["--ckpt", str(cond_ckpt), "--label", "3", "--n", "4", "--out", str(tmp_path / "g.png"),
             "--npz", str(tmp_path / "a.npz")])
    cli.main(["--ckpt", str(cond_ckpt), "--label", "5", "--n", "4", "--out", str(tmp_path / "g.png"),
             "--npz", str(tmp_path / "b.npz")])
    assert not np.array_equal(_npz(tmp_path / "a.npz")["x"], _npz(tmp_path / "b.npz")["x"])


@pytest.mark.parametrize("label", ["12", "-1"])
def test_cli_label_out_of_range(tmp_path: Path, cond_ckpt: Path, capsys, label):
    msg = _main_error(capsys, "--ckpt", str(cond_ckpt), "--label", label, "--out", str(tmp_path / "g.png"))
    assert "--label" in msg
    assert msg == f"error: --label must be in [0, 10), not {label}"


@pytest.mark.parametrize("args,needles", [
    (["--steps", "x"], ["argument --steps: invalid int value: 'x'"]),
    ([], ["the following arguments are required: --ckpt"]),
])
def test_cli_argparse_errors_are_one_line(tmp_path: Path, args, needles):
    line = assert_user_error(run_cli("scm_graph.sample", *args, cwd=tmp_path, timeout=120), *needles)
    assert line == f"error: {needles[0]}"


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "c.safetensors", "--n", "many"], "argument --n: invalid int value: 'many'"),
    (["--ckpt", "c.safetensors", "--times"], "argument --times: expected at least one argument"),
    (["--ckpt", "c.safetensors", "--times", "1.0", "soon"], "argument --times: invalid float value: 'soon'"),
    (["--ckpt", "c.safetensors", "--label", "cat"], "argument --label: invalid int value: 'cat'"),
    (["--ckpt", "c.safetensors", "--bogus"], "unrecognized arguments: --bogus"),
    (["--ckpt", "c.safetensors", "--solver", "rk4"], "argument --solver: invalid choice: 'rk4' (choose from "),
])
def test_cli_argparse_errors_say_what_is_wrong(tmp_path: Path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    msg = _main_error(capsys, *args)
    assert msg.startswith(f"error: {message}"), msg
    if "choose from" in message:  # the choices, quoted or not depending on the Python version
        assert "heun" in msg and "euler" in msg
    else:
        assert msg == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_cli_unwritable_out_folder_even_as_root(tmp_path: Path, sct_ckpt: Path, capsys, no_sampling, monkeypatch):
    """The permission check itself (root ignores mode bits, so the file system cannot show it there)."""
    import scm_graph.paths as paths

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(ro / "g.png"))
    assert msg == f"error: --out {ro}: the folder is not writable"
    assert list(ro.iterdir()) == []



# ----------------------------------------------------------------------------- labels and classifier-free guidance


@pytest.fixture(scope="module")
def cond_diffusion_ckpt(tmp_path_factory, shard_root: Path, scm_cache) -> Path:
    """A class-conditional tiny digits diffusion run with label dropout (the default 0.1)."""
    from tests.helpers import train_tiny

    return train_tiny("digits_diffusion.py", shard_root, tmp_path_factory.mktemp("run") / "cond_diff", 16,
                       "--net.class_conditional", "true")


def test_cli_guided_sampling_follows_cfg(tmp_path: Path, cond_diffusion_ckpt: Path):
    """--guidance s gives exactly the sampler run on F_u + s (F_c - F_u); s = 1 is the plain conditional one."""
    g = load_generator(cond_diffusion_ckpt, device="cpu")
    labels = torch.tensor([3, 4, 3, 4])
    for s in (1.0, 1.5):
        cli.main(["--ckpt", str(cond_diffusion_ckpt), "--steps", "3", "--n", "4", "--label", "3", "4", "--guidance", str(s),
                  "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / f"s{s}.npz")])
        want = generate(g, 4, steps=3, seed=0, labels=labels, guidance=s)
        torch.testing.assert_close(torch.from_numpy(_npz(tmp_path / f"s{s}.npz")["x"]), want, rtol=0, atol=0)
    assert not np.array_equal(_npz(tmp_path / "s1.0.npz")["x"], _npz(tmp_path / "s1.5.npz")["x"])


@pytest.mark.parametrize("which,args,message", [
    ("cond_diffusion_ckpt", ["--guidance", "-1"], "--guidance must be a finite number >= 0, not -1.0"),
    ("cond_diffusion_ckpt", ["--guidance", "nan"], "--guidance must be a finite number >= 0, not nan"),
    ("sct_ckpt", ["--guidance", "2"], "--guidance needs a class-conditional model; this one is unconditional"),
    ("cond_ckpt", ["--guidance", "2"], "--guidance applies to diffusion models and guidance-distilled sCD students; "
                                       "this consistency model takes no guidance"),
    ("cond_diffusion_ckpt", ["--label", "3", "10"], "--label must be in [0, 10), not 10"),
])
def test_cli_guidance_errors(request, tmp_path: Path, capsys, which, args, message):
    ckpt = request.getfixturevalue(which)
    assert _main_error(capsys, "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), *args) == f"error: {message}"


# ----------------------------------------------------------------------------- --t-mid


def test_cli_t_mid_reaches_the_sampler(tmp_path: Path, sct_ckpt: Path, capsys):
    """--t-mid T: the same seed's samples at [t_max, T], not at the default t_mid (the checkpoint's train.eval_t_mid)."""
    def npz(name, *args):
        cli.main(["--ckpt", str(sct_ckpt), "--n", "8", "--seed", "3", "--out", str(tmp_path / f"{name}.png"),
                 "--npz", str(tmp_path / f"{name}.npz"), *args])
        return _npz(tmp_path / f"{name}.npz")["x"]

    g = load_generator(sct_ckpt)
    assert g.t_mid == g.spec.train.eval_t_mid == 1.1
    default, mid = npz("default"), npz("mid", "--t-mid", "0.8")
    assert "2 step(s), t_mid 1.1" in capsys.readouterr().out.splitlines()[0]
    assert np.array_equal(default, generate(g, 8, times=[T_MAX, 1.1], seed=3).numpy())
    assert np.array_equal(mid, generate(g, 8, times=[T_MAX, 0.8], seed=3).numpy())
    assert not np.array_equal(mid, default)
    assert np.array_equal(npz("same", "--t-mid", "1.1"), default)
    # three steps start at t_mid too
    assert np.array_equal(npz("three", "--steps", "3", "--t-mid", "0.8"),
                          generate(g, 8, times=[T_MAX, 0.8, 0.8 * 2 / 3], seed=3).numpy())


@pytest.mark.parametrize("t_mid", ["0", "-0.5", repr(T_MAX), "2", "nan"])
def test_cli_t_mid_outside_0_t_max(tmp_path: Path, sct_ckpt: Path, capsys, t_mid):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(tmp_path / "g.png"), "--t-mid", t_mid)
    assert msg == f"error: --t-mid must lie in (0, t_max) = (0, {T_MAX:.4f}) for sigma_d 0.5, not {float(t_mid)}"
    assert not (tmp_path / "g.png").exists()


def test_cli_t_mid_subprocess_exit_code(tmp_path: Path, sct_ckpt: Path):
    res = run_cli("scm_graph.sample", "--ckpt", sct_ckpt, "--t-mid", "1.6", "--out", "g.png", cwd=tmp_path, timeout=120)
    assert_user_error(res, "--t-mid must lie in (0, t_max) = (0, 1.5645)", "not 1.6")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("which,args,message", [
    ("diffusion_ckpt", ["--t-mid", "0.8"],
     "--t-mid sets consistency sampling's intermediate time; this diffusion model integrates the PF-ODE"),
    ("sct_ckpt", ["--t-mid", "0.8", "--times", "1.5", "0.8"],
     "--t-mid and --times exclude each other (--times gives every sampling time)"),
    ("sct_ckpt", ["--t-mid", "0.8", "--steps", "1"], "--t-mid sets the time of the second step; --steps 1 has none"),
])
def test_cli_t_mid_errors(request, tmp_path: Path, capsys, which, args, message):
    ckpt = request.getfixturevalue(which)
    capsys.readouterr()  # a session fixture's training output, if it trained just now
    assert _main_error(capsys, "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), *args) == f"error: {message}"
