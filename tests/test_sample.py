"""Samplers against closed forms (point-mass data), time grids, the sampling CLI, save_grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

import scm_graph.sample as sm
from scm_graph.checkpoint import load_checkpoint
from scm_graph.data import normalize
from scm_graph.errors import UserError
from scm_graph.sample import (Generator, consistency_times, generate, load_generator, nfe, ode_times,
                              sample_consistency, sample_ode, save_grid, to_uint8)
from scm_graph.spec import DataSpec, ObjectiveSpec, Spec
from tests.conftest import assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_defaults")

SD = 0.5
T_MAX = math.atan(80 / SD)


# ----------------------------------------------------------------------------- closed-form stub


class PointMassF(nn.Module):
    """The exact TrigFlow F for data that is a point mass at `a`.

    x_t = cos t a + sin t z, and f(x_t, t) = cos t x_t - sin t sigma_d F must be a, so
    F(x_in, t) = (cos t x_t - a) / (sin t sigma_d) with x_t = sigma_d x_in.
    """

    def __init__(self, a: torch.Tensor, sigma_d: float):
        super().__init__()
        self.a, self.sigma_d, self.calls = a, sigma_d, 0

    def forward(self, x_in, t, labels=None, dropout_key=None):
        self.calls += 1
        assert t.shape == (x_in.shape[0],)
        x_t = self.sigma_d * x_in
        tt = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return ((torch.cos(tt) * x_t - self.a) / (torch.sin(tt) * self.sigma_d)).to(x_in.dtype)


def stub(kind: str, shape=(2, 4, 4), seed: int = 0) -> Generator:
    a = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5
    spec = Spec(data=DataSpec(resolution=shape[-1], channels=shape[0]), objective=ObjectiveSpec(kind=kind, sigma_d=SD))
    return Generator(PointMassF(a, SD), spec, torch.device("cpu"))


def unit_noise(n: int, shape=(2, 4, 4), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("times", [[T_MAX], [T_MAX, 1.1], [T_MAX, 1.1, 0.6], [1.5, 0.3, 0.01]])
def test_consistency_sampling_returns_the_point(times):
    g = stub("sct")
    noise = [unit_noise(8, seed=i) for i in range(len(times))]
    x = sample_consistency(g, noise, times)
    assert x.dtype == torch.float64 and x.shape == (8, 2, 4, 4)
    torch.testing.assert_close(x, g.model.a.expand_as(x), rtol=0, atol=1e-5)
    assert g.model.calls == len(times)


def test_consistency_sampling_with_a_wrong_model_is_not_the_point():
    """Guard: a stub for another point does not pass (the closed-form check can fail)."""
    g, other = stub("sct"), stub("sct", seed=5)
    x = sample_consistency(other, [unit_noise(4)], [T_MAX])
    assert (x - g.model.a).abs().max() > 0.1


def test_ode_heun_reaches_the_point():
    g = stub("diffusion")
    for steps in (8, 32, 64):
        x = sample_ode(g, unit_noise(8), ode_times(steps, SD), "heun")
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, g.model.a.expand_as(x), rtol=0, atol=1e-4)


def _trajectory_error(g: Generator, steps: int, solver: str) -> float:
    """Max error at t_min = arctan(0.002 / sigma_d) against x_t = cos t a + sin t z.

    (At t = 0 every solver lands on the denoiser output, which is exactly `a` for this model, so the
    solver's own error shows on the trajectory before the last step.)
    """
    noise = unit_noise(8)
    times = ode_times(steps, SD)[:-1]  # stop at sigma_min, before the final step to 0
    a = g.model.a
    x_start = SD * noise
    z = (x_start - math.cos(times[0]) * a) / math.sin(times[0])  # the trajectory through x_start
    exact = math.cos(times[-1]) * a + math.sin(times[-1]) * z
    return (sample_ode(g, noise, times, solver) - exact).abs().max().item()


def test_ode_error_shrinks_with_steps_and_heun_beats_euler():
    g = stub("diffusion")
    heun = {n: _trajectory_error(g, n, "heun") for n in (8, 16, 32, 64)}
    euler = {n: _trajectory_error(g, n, "euler") for n in (16, 32, 64)}
    assert heun[32] < heun[8] / 20 and heun[64] < heun[32] / 3 and heun[64] < 1e-4  # second order
    assert euler[64] < euler[32] < euler[16]
    assert euler[64] > euler[32] / 4  # only first order
    for n in (32, 64):
        assert euler[n] > 3 * heun[n]


def test_generate_uses_the_samplers_and_counts_nfe():
    for kind, solver, steps in [("sct", "heun", 1), ("sct", "heun", 3), ("diffusion", "heun", 6),
                                ("diffusion", "euler", 6)]:
        g = stub(kind)
        x = generate(g, 10, steps=steps, solver=solver, seed=3, batch=4)  # 3 batches
        assert x.shape == (10, 2, 4, 4) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert g.model.calls == 3 * nfe(g, steps, solver)
        torch.testing.assert_close(x, g.model.a.float().expand_as(x), rtol=0, atol=1e-4)
    g = stub("diffusion")
    assert torch.equal(generate(g, 5, steps=3, seed=1), generate(g, 5, steps=3, seed=1))


def test_generate_times_override_steps():
    g = stub("diffusion")
    a = generate(g, 4, steps=5, seed=2)
    b = generate(g, 4, times=ode_times(5, SD)[:-1], seed=2)  # the trailing 0 is appended
    assert torch.equal(a, b)
    c = stub("sct")
    assert torch.equal(generate(c, 4, steps=2, seed=2), generate(c, 4, times=[T_MAX, 1.1], seed=2))


# ----------------------------------------------------------------------------- time grids, nfe


@pytest.mark.parametrize("steps", [1, 2, 5, 18, 32])
@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_ode_times(steps: int, sigma_d: float):
    ts = ode_times(steps, sigma_d)
    assert len(ts) == steps + 1 and all(isinstance(t, float) for t in ts)
    assert ts[0] == pytest.approx(math.atan(80 / sigma_d), abs=1e-12) and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps > 1:
        assert ts[-2] == pytest.approx(math.atan(0.002 / sigma_d), rel=1e-9)
        sig = [sigma_d * math.tan(t) for t in ts[:-1]]  # EDM rho = 7 spacing
        r = [s ** (1 / 7) for s in sig]
        assert np.allclose(np.diff(r), (r[-1] - r[0]) / (steps - 1), rtol=1e-6, atol=1e-9)


def test_consistency_times():
    assert consistency_times(1, SD) == [T_MAX]
    assert consistency_times(2, SD) == [T_MAX, 1.1]
    ts = consistency_times(4, SD)
    assert len(ts) == 4 and ts[:2] == [T_MAX, 1.1] and all(a > b > 0 for a, b in zip(ts, ts[1:]))
    assert consistency_times(1, 1.0) == [math.atan(80.0)]
    for bad in (0, -1):
        with pytest.raises(UserError):
            consistency_times(bad, SD)
        with pytest.raises(UserError):
            ode_times(bad, SD)


def test_nfe():
    c, d = stub("sct"), stub("diffusion")
    for n in (1, 2, 7):
        assert nfe(c, n, "heun") == nfe(c, n, "euler") == n
        assert nfe(d, n, "euler") == n
        assert nfe(d, n, "heun") == 2 * n - 1


# ----------------------------------------------------------------------------- CLI on tiny checkpoints


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
        sm.main(["--ckpt", str(sct_ckpt), "--n", "16", "--out", str(tmp_path / f"{name}.png"),
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
        sm.main(["--ckpt", str(sct_ckpt), "--n", "8", "--out", str(tmp_path / f"{name}.png"),
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
        sm.main(["--ckpt", str(diffusion_ckpt), "--solver", solver, "--steps", "4", "--n", "8",
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
    assert_user_error(res, "nope.safetensors")
    assert not (tmp_path / "g.png").exists()


def test_cli_not_safetensors(tmp_path: Path):
    p = tmp_path / "junk.safetensors"
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    mtime = p.stat().st_mtime_ns
    res = run_cli("scm_graph.sample", "--ckpt", p, "--out", tmp_path / "g.png", cwd=tmp_path, timeout=120)
    assert_user_error(res, "junk.safetensors")
    assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert not (tmp_path / "g.png").exists()


def test_cli_safetensors_without_metadata(tmp_path: Path):
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(p))
    data = p.read_bytes()
    res = run_cli("scm_graph.sample", "--ckpt", p, "--out", tmp_path / "g.png", cwd=tmp_path, timeout=120)
    assert_user_error(res, "plain.safetensors", "metadata")
    assert p.read_bytes() == data and not (tmp_path / "g.png").exists()


def _main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        sm.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_label_on_unconditional(tmp_path: Path, sct_ckpt: Path, capsys):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--label", "3", "--out", str(tmp_path / "g.png"))
    assert "unconditional" in msg and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--n", "0"], "--n"),
    (["--times", "2.0"], "--times"),
    (["--times", "1.0", "0"], "--times"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_values(tmp_path: Path, sct_ckpt: Path, capsys, args, needle):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(tmp_path / "g.png"), *args)
    assert needle in msg and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("times", [["0.6", "1.1", "1.5"], ["1.1", "1.1"]])
def test_cli_times_must_decrease(tmp_path: Path, sct_ckpt: Path, capsys, times):
    msg = _main_error(capsys, "--ckpt", str(sct_ckpt), "--out", str(tmp_path / "g.png"), "--times", *times)
    assert "--times" in msg and not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory, shard_root: Path, scm_cache) -> Path:
    """A class-conditional tiny digits sCT run (1 step)."""
    from tests.conftest import _train_tiny

    return _train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "cond", 16,
                       "--net.class_conditional", "true")


def test_cli_label_on_conditional(tmp_path: Path, cond_ckpt: Path):
    sm.main(["--ckpt", str(cond_ckpt), "--label", "3", "--n", "4", "--out", str(tmp_path / "g.png"),
             "--npz", str(tmp_path / "a.npz")])
    sm.main(["--ckpt", str(cond_ckpt), "--label", "5", "--n", "4", "--out", str(tmp_path / "g.png"),
             "--npz", str(tmp_path / "b.npz")])
    assert not np.array_equal(_npz(tmp_path / "a.npz")["x"], _npz(tmp_path / "b.npz")["x"])


@pytest.mark.parametrize("label", ["12", "-1"])
def test_cli_label_out_of_range(tmp_path: Path, cond_ckpt: Path, capsys, label):
    msg = _main_error(capsys, "--ckpt", str(cond_ckpt), "--label", label, "--out", str(tmp_path / "g.png"))
    assert "--label" in msg


# ----------------------------------------------------------------------------- save_grid, to_uint8


@pytest.mark.parametrize("n,nrow,c,h,min_side,size", [
    (10, 4, 1, 8, 64, (4 * 65 + 1, 3 * 65 + 1)),  # 3 rows of 4, 8 px upscaled x8
    (10, None, 1, 8, 64, (4 * 65 + 1, 3 * 65 + 1)),  # default nrow = ceil(sqrt(n))
    (64, None, 1, 8, 64, (8 * 65 + 1, 8 * 65 + 1)),
    (3, 5, 3, 8, 16, (5 * 17 + 1, 1 * 17 + 1)),  # x2
    (4, 2, 3, 32, 64, (2 * 65 + 1, 2 * 65 + 1)),  # 32 px -> 64 px
    (2, 1, 3, 32, 16, (33 + 1, 2 * 33 + 1)),  # already large enough: no upscaling
    (1, None, 1, 8, 8, (10, 10)),
])
def test_save_grid_dimensions(tmp_path: Path, n, nrow, c, h, min_side, size):
    imgs = torch.randint(0, 256, (n, c, h, h), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = tmp_path / "sub" / "grid.png"
    save_grid(imgs, p, nrow=nrow, min_side=min_side, pad=1)
    with Image.open(p) as im:
        assert im.size == size and im.mode == ("L" if c == 1 else "RGB")
        arr = np.asarray(im)
    scale = max(1, min_side // h)
    s = h * scale
    if c == 1:
        arr = arr[..., None]
    per_row = nrow or math.ceil(math.sqrt(n))
    for i in range(n):  # every cell holds its image, upscaled by pixel repetition
        r, q = divmod(i, per_row)
        cell = arr[1 + r * (s + 1): 1 + r * (s + 1) + s, 1 + q * (s + 1): 1 + q * (s + 1) + s]
        want = imgs[i].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(cell, want), i
    assert (arr[0] == 255).all() and (arr[:, 0] == 255).all()  # white padding


def test_save_grid_default_pad_grows_with_upscaling(tmp_path: Path):
    imgs = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    save_grid(imgs, tmp_path / "g.png", nrow=2, min_side=64)  # x8 upscaling -> 4 px separators
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * 68 + 4, 2 * 68 + 4)
        arr = np.asarray(im)
    assert (arr[:4] == 255).all() and (arr[4:68, 4:68] == 0).all()


def test_to_uint8_inverts_normalize():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    for norm, extra in [("pixel", {}), ("channel", {"mean": (80.0,), "std": (90.0,)})]:
        spec = Spec(data=DataSpec(resolution=8, channels=1, normalize=norm, **extra))
        x = normalize(u8, spec.data, 0.5)
        assert torch.equal(to_uint8(x, spec), u8)
        assert torch.equal(to_uint8(x + 100.0, spec), torch.full_like(u8, 255))
        assert torch.equal(to_uint8(x - 100.0, spec), torch.zeros_like(u8))


@pytest.mark.parametrize("args", [["--steps", "x"], []])
def test_cli_argparse_errors_are_one_line(tmp_path: Path, args):
    assert_user_error(run_cli("scm_graph.sample", *args, cwd=tmp_path, timeout=120))
