"""Reference statistics files (scm_graph.eval.refs) and `python -m scm_graph.eval ref`: round trips, clean-fid's
mu / sigma files, one-line errors for what a file lacks, and the CLI's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import scm_graph.eval.cli as ev_cli
from scm_graph.eval.frechet import FeatureStats
from scm_graph.eval.inception import INCEPTION_URL
from scm_graph.eval.refs import load_refs, save_refs
from tests.eval.test_features import make_dinov2_standin
from tests.helpers import assert_user_error, one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_defaults")


def _stats(d: int, n: int, seed: int) -> FeatureStats:
    rng = np.random.default_rng(seed)
    return FeatureStats.of(rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d) + rng.standard_normal(d))


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def dinov2_repo(tmp_path_factory) -> Path:
    return make_dinov2_standin(tmp_path_factory.mktemp("dinov2"))


def _exit_line(capsys, argv: list, *needles: str, code: int = 2) -> str:
    """ev_cli.main(argv) exits `code` with exactly one stderr line `error: ...` holding every needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev_cli.main([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == code and len(lines) == 1 and lines[0].startswith("error: "), (e.value.code, lines)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path: Path):
    stats = {"fd_dinov2": _stats(5, 40, 0), "fid": _stats(3, 20, 1)}
    path = tmp_path / "sub" / "refs.npz"
    save_refs(path, stats, "made by a test")
    assert sorted(p.name for p in path.parent.iterdir()) == ["refs.npz"]  # no temp file left
    for metrics in (["fd_dinov2", "fid"], ["fid"], ("fd_dinov2",)):
        got = load_refs(path, metrics)
        assert list(got) == list(metrics)
        for m in metrics:
            assert got[m].n == stats[m].n and got[m].mu.dtype == got[m].sigma.dtype == np.float64
            assert np.array_equal(got[m].mu, stats[m].mu) and np.array_equal(got[m].sigma, stats[m].sigma)
    raw = _npz(path)
    assert str(raw["source"]) == "made by a test" and int(raw["fid_n"]) == 20
    save_refs(path, {"fid": stats["fid"]}, "again")  # replaced whole
    assert set(_npz(path)) == {"source", "fid_mu", "fid_sigma", "fid_n"}


def test_clean_fid_file_loads_as_fid(tmp_path: Path):
    s = _stats(4, 30, 2)
    path = tmp_path / "cifar10_clean_train_32.npz"
    np.savez(path, mu=s.mu.astype(np.float32), sigma=s.sigma)
    got = load_refs(path, ["fid"])["fid"]
    assert got.n == 0 and got.mu.dtype == np.float64
    assert np.array_equal(got.mu, s.mu.astype(np.float32).astype(np.float64)) and np.array_equal(got.sigma, s.sigma)
    assert one_line_error(load_refs, path, ["fd_dinov2"]) == f"reference statistics {path} hold no fd_dinov2 statistics (they hold: fid)"


def test_a_file_lacking_the_metric_names_what_it_holds(tmp_path: Path):
    path = tmp_path / "refs.npz"
    save_refs(path, {"fd_dinov2": _stats(3, 10, 0)}, "x")
    assert one_line_error(load_refs, path, ["fd_dinov2", "fid"]) == (
        f"reference statistics {path} hold no fid statistics (they hold: fd_dinov2)")
    np.savez(tmp_path / "half.npz", fid_mu=np.zeros(3), fd_dinov2_mu=np.zeros(2), fd_dinov2_sigma=np.eye(2))  # no fid_sigma
    assert one_line_error(load_refs, tmp_path / "half.npz", ["fid"]) == (
        f"reference statistics {tmp_path / 'half.npz'} hold no fid statistics (they hold: fd_dinov2)")
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    assert one_line_error(load_refs, tmp_path / "other.npz", ["fid"]).endswith("hold no fid statistics (they hold: none)")


def test_missing_unreadable_and_misshapen_files(tmp_path: Path):
    msg = one_line_error(load_refs, tmp_path / "nope.npz", ["fid"])
    assert msg.startswith(f"reference statistics {tmp_path / 'nope.npz'} not found") and "python -m scm_graph.eval ref" in msg
    (tmp_path / "junk.npz").write_text("not a zip\n")
    assert one_line_error(load_refs, tmp_path / "junk.npz", ["fid"]) == f"reference statistics {tmp_path / 'junk.npz'} are not a .npz file"
    np.savez(tmp_path / "bad.npz", fid_mu=np.zeros(3), fid_sigma=np.zeros((3, 2)))
    assert one_line_error(load_refs, tmp_path / "bad.npz", ["fid"]) == (
        f"reference statistics {tmp_path / 'bad.npz'}: fid has mean (3,) and covariance (3, 2)")
    np.savez(tmp_path / "pickled.npz", fid_mu=np.array([object()], dtype=object), fid_sigma=np.zeros((1, 1)))
    assert one_line_error(load_refs, tmp_path / "pickled.npz", ["fid"]).startswith("cannot read reference statistics")


# ----------------------------------------------------------------------------- `eval ref` and --ref on the CLI


def test_ref_refuses_an_existing_out_without_force(tmp_path: Path, shard_root: Path, dinov2_repo: Path, capsys):
    out = tmp_path / "refs.npz"
    out.write_bytes(b"keep me")
    base = ["ref", "--shards", shard_root / "digits", "--out", out, "--metric", "fd_dinov2", "--dinov2", dinov2_repo,
            "--n", "40", "--batch", "16", "--device", "cpu"]
    assert _exit_line(capsys, base) == f"error: {out} exists; pass --force to overwrite it"
    assert out.read_bytes() == b"keep me"
    ev_cli.main([str(a) for a in [*base, "--force"]])
    assert capsys.readouterr().out.strip() == f"wrote {out}: fd_dinov2 of 40 images of {shard_root / 'digits'}"
    got = load_refs(out, ["fd_dinov2"])["fd_dinov2"]
    assert got.n == 40 and got.mu.shape == (32,) and "first 40 of 1797 images" in str(_npz(out)["source"])
    assert _exit_line(capsys, [*base[:4], tmp_path / "refs.txt", *base[5:]]) == (
        f"error: --out {tmp_path / 'refs.txt'}: the file name must end in .npz")
    _exit_line(capsys, [*base, "--force", "--n", "1"], "--n must be at least 2, not 1")  # checked before any work
    _exit_line(capsys, [*base, "--force", "--metric", "fd_nope"], "--metric", "invalid choice")


def test_ref_refuses_a_latent_shard_set(tmp_path: Path, dinov2_repo: Path, capsys):
    from tests.data.latentsets import write_latent_set

    arrays = np.random.default_rng(0).standard_normal((8, 8, 4, 4)).astype(np.float16)
    write_latent_set(tmp_path / "shards", "lat", arrays)
    out = tmp_path / "refs.npz"
    line = _exit_line(capsys, ["ref", "--shards", tmp_path / "shards" / "lat", "--out", out, "--metric", "fd_dinov2",
                               "--dinov2", dinov2_repo, "--device", "cpu"])
    assert line.startswith(f"error: {tmp_path / 'shards' / 'lat'} holds VAE latents; compute references from a pixel shard set")
    assert not out.exists()


def test_fid_without_inception_weights_is_one_line(tmp_path: Path, shard_root: Path):
    """No Inception weights: one `error:` line naming the file and its download URL, exit 2, no traceback, nothing written."""
    (tmp_path / "inception").mkdir()
    out = tmp_path / "refs.npz"
    res = run_cli("scm_graph.eval", "ref", "--shards", shard_root / "digits", "--out", out, "--metric", "fid",
                  "--inception", tmp_path / "inception", cwd=tmp_path, timeout=120)
    line = assert_user_error(res, INCEPTION_URL, str(tmp_path / "inception" / "inception-2015-12-05.pt"))
    assert "Traceback" not in res.stderr and res.stdout == "" and not out.exists(), line


def test_eval_fid_without_inception_weights_is_one_line(tmp_path: Path, sct_ckpt: Path, capsys):
    (tmp_path / "inception").mkdir()
    ref = tmp_path / "refs.npz"
    save_refs(ref, {"fid": _stats(3, 10, 0)}, "x")
    _exit_line(capsys, ["--ckpt", sct_ckpt, "--metric", "fid", "--ref", ref, "--inception", tmp_path / "inception",
                        "--n", "8", "--device", "cpu"], INCEPTION_URL, "are missing")


def test_eval_refs_errors_are_one_line(tmp_path: Path, sct_ckpt: Path, dinov2_repo: Path, capsys):
    """--ref missing, absent, lacking the metric, or of another feature width; --dinov2 missing."""
    base = ["--ckpt", sct_ckpt, "--metric", "fd_dinov2", "--n", "8", "--device", "cpu"]
    _exit_line(capsys, [*base, "--ref", tmp_path / "nope.npz", "--dinov2", dinov2_repo],
               f"reference statistics {tmp_path / 'nope.npz'} not found", "python -m scm_graph.eval ref")
    line = _exit_line(capsys, [*base, "--dinov2", dinov2_repo], "--ref")
    assert "fd_dinov2" in line
    ref = tmp_path / "refs.npz"
    save_refs(ref, {"fid": _stats(3, 10, 0)}, "x")
    _exit_line(capsys, [*base, "--ref", ref, "--dinov2", dinov2_repo], "hold no fd_dinov2 statistics (they hold: fid)")
    _exit_line(capsys, [*base, "--ref", ref], "--dinov2", "https://github.com/facebookresearch/dinov2")
    save_refs(ref, {"fd_dinov2": _stats(3, 10, 0)}, "x")  # 3 features; the stand-in makes 32
    _exit_line(capsys, [*base, "--ref", ref, "--dinov2", dinov2_repo], "the fd_dinov2 reference statistics hold 3 features, but its feature network makes 32")


def test_fd_digits_against_the_held_out_digits(tmp_path: Path, sct_ckpt: Path, shard_root: Path, capsys):
    """`eval ref --metric fd_digits` on the held-out split, then `eval --ref` with it: the FD of the samples against
    exactly the held-out images' features (computed here directly); a file without fd_digits statistics, or
    fd_digits on non-digits shards, is one line."""
    import json

    from scm_graph.data.digits import N_HELDOUT, load_digits_uint8, split_indices
    from scm_graph.eval.digits import digits_features
    from scm_graph.shard import main as shard_main

    shard_main(["digits", "--split", "heldout", "--out", str(tmp_path / "shards")])
    ref = tmp_path / "heldout.npz"
    ev_cli.main(["ref", "--shards", str(tmp_path / "shards" / "digits-heldout"), "--out", str(ref), "--metric", "fd_digits"])
    got = load_refs(ref, ["fd_digits"])["fd_digits"]
    want = FeatureStats.of(digits_features(load_digits_uint8()[0][split_indices("heldout")]).astype(np.float64))
    assert got.n == N_HELDOUT
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-6, atol=1e-9)
    capsys.readouterr()
    args = ["--ckpt", str(sct_ckpt), "--steps", "1", "--n", "64", "--json"]
    ev_cli.main(args)
    everything = json.loads(capsys.readouterr().out.splitlines()[0])["fd"]
    ev_cli.main([*args, "--ref", str(ref)])
    heldout = json.loads(capsys.readouterr().out.splitlines()[0])["fd"]
    assert heldout != everything  # the same samples, another reference
    other = tmp_path / "other.npz"
    save_refs(other, {"fd_dinov2": _stats(5, 40, 0)}, "no digits here")
    _exit_line(capsys, [*args, "--ref", other], "holds no fd_digits statistics", "eval ref --metric fd_digits")
    _exit_line(capsys, ["ref", "--shards", shard_root / "cifar10", "--out", tmp_path / "c.npz", "--metric", "fd_digits"],
               "fd_digits scores the 8x8 digits only", "3x32x32")
