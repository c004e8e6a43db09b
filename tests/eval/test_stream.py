"""Streaming evaluation (scm_graph.eval.moments / stream / evaluator): float64 moments that batches add to and
processes merge, the per-sample-seeded stream split over processes, FDs through the stream against FDs
computed by hand, `eval ref`, a latent model's decoded samples, and torchrun (2 gloo processes on the CPU)
against one process. FD_DINOv2 runs on the tiny stand-in of tests/eval/test_features.py."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scm_graph.eval.cli as ev_cli
from scm_graph.data.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.eval.digits import DigitsFeatures, digits_features, real_digits_stats
from scm_graph.eval.dinov2 import DinoV2Features
from scm_graph.eval.evaluator import Metrics, evaluate, load_metrics
from scm_graph.eval.features import FeatureWeights
from scm_graph.eval.frechet import FeatureStats, frechet_distance
from scm_graph.eval.moments import Moments
from scm_graph.eval.refs import load_refs, save_refs
from scm_graph.eval.stream import (
    SampleSpec,
    Split,
    featurize,
    real_images,
    sample_images,
)
from scm_graph.sample.generate import generate, load_generator, to_images, to_uint8
from tests.eval.test_features import load_standin, make_dinov2_standin, standin_features
from tests.helpers import REPO, TorchDefaults, cli_env, one_line_error

pytestmark = pytest.mark.usefixtures("torch_defaults")

REL = 1e-10


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated features with non-zero means."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3 * rng.standard_normal(d)


@pytest.fixture(scope="module")
def dinov2_repo(tmp_path_factory) -> Path:
    return make_dinov2_standin(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def dinov2_ref(tmp_path_factory, dinov2_repo: Path) -> tuple[Path, FeatureStats]:
    """Stand-in reference statistics of the first 300 real digits (computed by hand), saved as an npz."""
    stats = FeatureStats.of(standin_features(load_standin(dinov2_repo), torch.from_numpy(load_digits_uint8()[0][:300])).double().numpy())
    path = tmp_path_factory.mktemp("refs") / "digits_dinov2.npz"
    save_refs(path, {"fd_dinov2": stats}, "first 300 digits, by hand")
    return path, stats


# ----------------------------------------------------------------------------- Moments


def test_moments_in_uneven_batches_equal_all_at_once():
    f = _features(103, 7)
    m = Moments.empty(7)
    assert (m.n, m.dim) == (0, 7)
    start = 0
    for size in (1, 17, 0, 2, 40, 43):
        m.add(f[start : start + size])
        start += size
    whole = FeatureStats.of(f)
    s = m.stats()
    assert s.n == whole.n == 103 and s.mu.dtype == s.sigma.dtype == np.float64
    assert _rel(s.mu, whole.mu) < REL and _rel(s.sigma, whole.sigma) < REL
    assert np.array_equal(s.sigma, s.sigma.T)
    # torch tensors of any float dtype are summed in float64
    t = Moments.empty(7)
    for chunk in torch.from_numpy(f).float().split(10):
        t.add(chunk)
    ref = FeatureStats.of(torch.from_numpy(f).float().double().numpy())
    assert _rel(t.stats().mu, ref.mu) < REL and _rel(t.stats().sigma, ref.sigma) < REL
    half = Moments.empty(7)
    half.add(torch.from_numpy(f).to(torch.bfloat16))
    assert _rel(half.stats().sigma, FeatureStats.of(torch.from_numpy(f).to(torch.bfloat16).double().numpy()).sigma) < REL


def test_moments_merge_of_two_halves_equals_the_whole():
    f = _features(60, 5, seed=1)
    a, b, whole = Moments.empty(5), Moments.empty(5), Moments.empty(5)
    a.add(f[:23])
    b.add(f[23:])
    whole.add(f)
    merged = a.merge(b)
    assert merged.n == 60 and (a.n, b.n) == (23, 37)  # merge makes a new object
    assert _rel(merged.s, whole.s) < REL and _rel(merged.S, whole.S) < REL
    assert _rel(merged.stats().sigma, FeatureStats.of(f).sigma) < REL
    assert _rel(b.merge(a).stats().mu, FeatureStats.of(f).mu) < REL
    same = a.merge(Moments.empty(5))
    assert same.n == 23 and np.array_equal(same.s, a.s) and np.array_equal(same.S, a.S)
    assert one_line_error(a.merge, Moments.empty(4)) == "cannot merge moments of 5 and 4 features"
    assert a.all_reduce() is a  # no process group: a no-op


def test_moments_stats_need_two_samples():
    m = Moments.empty(3)
    assert one_line_error(m.stats) == "need at least 2 samples for a covariance, got 0"
    m.add(np.ones((1, 3)))
    assert one_line_error(m.stats) == "need at least 2 samples for a covariance, got 1"
    m.add(np.zeros((1, 3)))
    s = m.stats()
    assert s.n == 2 and np.allclose(s.mu, 0.5) and np.allclose(s.sigma, 0.5)


@pytest.mark.parametrize("bad,message", [
    (np.array([[1.0, np.nan, 0.0]]), "the feature network returned non-finite values"),
    (torch.tensor([[0.0, float("inf"), 1.0], [0.0, 0.0, 0.0]]), "the feature network returned non-finite values"),
    (np.zeros((4, 2)), "features must be [N, 3], got shape (4, 2)"),
    (np.zeros(3), "features must be [N, 3], got shape (3,)"),
    (torch.zeros(2, 3, 1), "features must be [N, 3], got shape (2, 3, 1)"),
], ids=["nan", "inf", "width", "1-d", "3-d"])
def test_moments_reject_bad_features(bad, message):
    m = Moments.empty(3)
    m.add(np.ones((2, 3)))
    assert one_line_error(m.add, bad) == message
    assert m.n == 2 and np.array_equal(m.s, np.full(3, 2.0)) and np.array_equal(m.S, np.full((3, 3), 2.0))  # unchanged


# ----------------------------------------------------------------------------- the stream


def test_split_current_is_one_process_without_torchrun():
    assert Split.current() == Split(0, 1)


def test_a_sample_does_not_depend_on_the_batch_or_the_other_samples(sct_ckpt: Path):
    """Per-sample seeds: the same n samples in batches of 3, 8 or all at once, and the first 5 of 12 are the 5 of 5."""
    g = load_generator(sct_ckpt)
    whole = [torch.cat(list(sample_images(g, SampleSpec(n=12, steps=2, seed=5, batch=b)))) for b in (3, 8, 12)]
    assert torch.equal(whole[0], whole[1]) and torch.equal(whole[0], whole[2])
    assert torch.equal(torch.cat(list(sample_images(g, SampleSpec(n=5, steps=2, seed=5, batch=2)))), whole[0][:5])
    other = torch.cat(list(sample_images(g, SampleSpec(n=12, steps=2, seed=6, batch=4))))
    assert not torch.equal(other, whole[0])
    # every (seed, index) has its own noise, also where the two differ only above 32 bits
    x = generate(g, 2, steps=1, seed=0, sample_ids=torch.tensor([0, 2**32]))
    y = generate(g, 1, steps=1, seed=2**31 - 1, sample_ids=torch.tensor([0]))
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[0], y[0])


@pytest.mark.parametrize("n,batch,size", [(23, 4, 3), (20, 5, 2), (7, 10, 2), (1000, 64, 2)])
def test_real_image_shares_add_up_to_the_first_n(n: int, batch: int, size: int):
    """real_images: batches of at most `batch` of the first n images; rank r of `size` keeps the images i with
    (i // batch) % size == r, in order, so the shares add up to the first n exactly once."""
    def pixels():  # image i holds i in its first two bytes
        for i in range(n + 30):
            yield bytes([i // 256, i % 256, 7, 9]), i % 10

    def ids(batches):
        assert all(x.dtype == torch.uint8 and x.shape[1:] == (1, 2, 2) and 1 <= len(x) <= batch for x in batches)
        return [int(x[0, 0]) * 256 + int(x[0, 1]) for xs in batches for x in xs[:, 0]]

    assert ids(list(real_images(pixels(), (1, 2, 2), n, batch))) == list(range(n))
    shares = [ids(list(real_images(pixels(), (1, 2, 2), n, batch, Split(r, size)))) for r in range(size)]
    for r, share in enumerate(shares):
        assert share == [i for i in range(n) if (i // batch) % size == r]
        assert Split(r, size).share(n, batch) == len(share)  # the progress bar's total
    assert sorted(i for share in shares for i in share) == list(range(n))
    assert ids(list(real_images(pixels(), (1, 2, 2), n + 100, batch))) == list(range(n + 30))  # a short stream: all of it


def test_split_streams_merge_to_the_single_stream(sct_ckpt: Path, dinov2_repo: Path):
    """featurize(sample_images(...)) of Split(0, 2) merged with Split(1, 2) equals Split(0, 1): same n, same
    float64 moments to 1e-10 (only the order of the float64 sums differs), for both feature networks."""
    g = load_generator(sct_ckpt)
    nets = [DigitsFeatures(), DinoV2Features(str(dinov2_repo))]
    spec = SampleSpec(n=50, steps=2, seed=3, batch=8)
    one = featurize(sample_images(g, spec, Split(0, 1)), nets)
    halves = [featurize(sample_images(g, spec, Split(r, 2)), nets) for r in (0, 1)]
    assert [halves[r]["fd_digits"].n for r in (0, 1)] == [8 + 8 + 8 + 2, 8 + 8 + 8]  # chunks 0 2 4 6 / 1 3 5
    for metric in ("fd_digits", "fd_dinov2"):
        merged = halves[0][metric].merge(halves[1][metric])
        assert merged.n == one[metric].n == 50
        a, b = merged.stats(), one[metric].stats()
        assert _rel(a.mu, b.mu) < REL and _rel(a.sigma, b.sigma) < REL, metric
    # the batches really are generate() at the per-sample seeds
    first = next(sample_images(g, SampleSpec(n=8, steps=2, seed=3, batch=8)))
    assert torch.equal(first, to_uint8(generate(g, 8, steps=2, seed=3, sample_ids=torch.arange(8)), g.spec))


# The FD is only Lipschitz away from singular covariances: tr((S_a S_b)^{1/2}) moves by ~sqrt(|dS|) along a zero
# eigenvalue. The 4-step digits run's 1-step samples are near-constant (pixels 76..80, 64 digits features from 50
# samples), so float64 rounding of the moments (one-pass sums vs FeatureStats.of's two passes) moves the FD by up
# to ~1e-8 there; the moments themselves agree to 1e-10. Hence FD_TOL: a wrong chunk, seed or label is >> 1e-6.
FD_TOL = {"rel": 1e-9, "abs": 1e-6}


def test_streamed_fd_equals_fd_by_hand(sct_ckpt: Path, dinov2_repo: Path, dinov2_ref):
    """evaluate() at batch 7 (8 chunks of n = 50) with fd_digits and fd_dinov2: each FD equals the FD of the same
    chunks generated here (generate at the per-sample seeds), featurised independently, concatenated and fitted
    by FeatureStats.of (two-pass), scored by frechet_distance; the streamed moments equal those stats to 1e-10."""
    ref_path, ref_stats = dinov2_ref
    g = load_generator(sct_ckpt)
    metrics = load_metrics(g.spec, g.device, ["fd_digits", "fd_dinov2"], str(ref_path), FeatureWeights(dinov2=str(dinov2_repo)))
    n, batch, seed = 50, 7, 11
    rows = evaluate(g, [1, 2], n=n, seed=seed, metrics=metrics, batch=batch)
    standin = load_standin(dinov2_repo)
    for row in rows:
        assert (row.sampler, row.nfe, row.n) == ("consistency", row.steps, n) and set(row.values) == {"fd", "fd_dinov2"}
        feats: dict[str, list[np.ndarray]] = {"fd_digits": [], "fd_dinov2": []}
        for c in range(-(-n // batch)):
            b = min(batch, n - c * batch)
            images = to_uint8(generate(g, b, steps=row.steps, batch=b, seed=seed, sample_ids=torch.arange(c * batch, c * batch + b)), g.spec)
            feats["fd_digits"].append(digits_features(images))
            feats["fd_dinov2"].append(standin_features(standin, images).double().numpy())
        by_hand = {m: FeatureStats.of(np.concatenate(f)) for m, f in feats.items()}
        streamed = featurize(sample_images(g, SampleSpec(n, row.steps, seed=seed, batch=batch)), metrics.nets)
        for m, stats in by_hand.items():
            got = streamed[m].stats()
            assert got.n == n and _rel(got.mu, stats.mu) < REL and _rel(got.sigma, stats.sigma) < REL, (row.steps, m)
        fd_digits = frechet_distance(by_hand["fd_digits"], real_digits_stats())
        fd_dino = frechet_distance(by_hand["fd_dinov2"], ref_stats)
        assert row.values["fd"] == pytest.approx(fd_digits, **FD_TOL) and row.fd == row.values["fd"]
        assert row.values["fd_dinov2"] == pytest.approx(fd_dino, **FD_TOL)
        assert fd_dino > 1e-3 and fd_digits > 1e-3
        assert row.log_keys() == {f"fd_{row.steps}step": row.values["fd"], f"fd_dinov2_{row.steps}step": row.values["fd_dinov2"]}
    assert rows[0].values != rows[1].values


def test_ref_cli_equals_stats_by_hand(tmp_path: Path, shard_root: Path, dinov2_repo: Path, capsys):
    """`eval ref` of the digits shards (first 300, batch 64) equals FeatureStats.of the stand-in's features of the
    same images (the shards hold the digits in order)."""
    out = tmp_path / "refs.npz"
    ev_cli.main(["ref", "--shards", str(shard_root / "digits"), "--out", str(out), "--metric", "fd_dinov2",
                 "--dinov2", str(dinov2_repo), "--n", "300", "--batch", "64", "--device", "cpu"])
    assert "wrote" in capsys.readouterr().out
    got = load_refs(out, ["fd_dinov2"])["fd_dinov2"]
    images = torch.from_numpy(load_digits_uint8()[0][:300])
    standin = load_standin(dinov2_repo)
    by_hand = FeatureStats.of(np.concatenate([standin_features(standin, images[i : i + 64]).double().numpy() for i in range(0, 300, 64)]))
    assert got.n == 300 and _rel(got.mu, by_hand.mu) < REL and _rel(got.sigma, by_hand.sigma) < REL


def test_evaluate_refuses_too_few_samples(sct_ckpt: Path):
    g = load_generator(sct_ckpt)
    with pytest.raises(UserError, match="need at least 2 samples for a covariance, got 1"):
        evaluate(g, [1], n=1)


# ----------------------------------------------------------------------------- a latent model


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny class-conditional sCT model on 4x4x4 latents of a random tiny AutoencoderKL (32x32 RGB images),
    as in tests/sample/test_latent_sample.py: {vae, ckpt}."""
    from tests.data.latentsets import encode_latent_set
    from tests.helpers import make_tiny_vae, train_tiny

    base = tmp_path_factory.mktemp("latent")
    with TorchDefaults():
        vae = make_tiny_vae(base / "vae")
        encode_latent_set(base / "shards", "lat", vae)
    ckpt = train_tiny("digits_sct.py", base / "shards", base / "run", 32, "--data.name", "lat", "--net.class_conditional", "true")
    return {"vae": vae.resolve(), "ckpt": ckpt}


class Recording:
    """A feature net that records the images it is given."""

    def __init__(self, net):
        self.net, self.metric, self.dim, self.seen = net, net.metric, net.dim, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return self.net(images)


def test_latent_model_is_decoded_before_featurising(latent_run, dinov2_repo: Path, tmp_path: Path, capsys):
    """fd_dinov2 of a latent model scores the VAE's decoded 3x32x32 uint8 images (not the 4x4x4 latents): the
    images the feature net sees are to_images of the per-sample-seeded, label-spread samples; the CLI gives the same FD."""
    g = load_generator(latent_run["ckpt"])
    assert (g.spec.data.channels, g.spec.data.resolution, g.spec.data.num_classes) == (4, 4, 4)
    standin = load_standin(dinov2_repo)
    ref_images = torch.randint(0, 256, (40, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = FeatureStats.of(standin_features(standin, ref_images).double().numpy())
    net = Recording(DinoV2Features(str(dinov2_repo)))
    n, batch = 10, 4
    (row,) = evaluate(g, [1], n=n, seed=2, metrics=Metrics([net], {"fd_dinov2": ref}), batch=batch)
    assert [tuple(x.shape) for x in net.seen] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    assert all(x.dtype == torch.uint8 for x in net.seen) and g.vae is not None and g.vae.path == str(latent_run["vae"])
    expected = []
    for c in range(3):
        b = min(batch, n - c * batch)
        labels = torch.arange(c * batch, c * batch + b) % 4
        expected.append(to_images(g, generate(g, b, steps=1, batch=b, labels=labels, seed=2, sample_ids=torch.arange(c * batch, c * batch + b))))
    assert torch.equal(torch.cat(net.seen), torch.cat(expected)) and torch.cat(expected).float().std() > 0
    by_hand = frechet_distance(FeatureStats.of(np.concatenate([standin_features(standin, x).double().numpy() for x in expected])), ref)
    assert row.values == {"fd_dinov2": pytest.approx(by_hand, **FD_TOL)}  # 10 samples < 32 features: singular
    # the CLI: the model's own VAE (data.vae), --n 10 --batch 4
    refs = tmp_path / "refs.npz"
    save_refs(refs, {"fd_dinov2": ref}, "random images")
    ev_cli.main(["--ckpt", str(latent_run["ckpt"]), "--metric", "fd_dinov2", "--dinov2", str(dinov2_repo), "--ref", str(refs),
                 "--n", "10", "--batch", "4", "--steps", "1", "--seed", "2", "--json", "--device", "cpu"])
    (rec,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rec["fd_dinov2"] == pytest.approx(row.values["fd_dinov2"], rel=1e-12) and "fd" not in rec


# ----------------------------------------------------------------------------- torchrun


def _torchrun(*args: str, n: int = 2) -> list[str]:
    """`python -m <args>` under torchrun. The command goes through `sh -c` as one string: torchrun's own argparse
    (Python 3.11) scans every later argument and stops at `--n` ("ambiguous option: --n could match --nnodes,
    --nproc-per-node, ...") even after the script name."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "--no-python",
            "sh", "-c", shlex.join([sys.executable, *args])]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=cli_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_torchrun_eval_equals_one_process(sct_ckpt: Path, dinov2_repo: Path, dinov2_ref):
    """The eval CLI on 2 gloo processes (each featurising its chunks, moments all-reduced) prints the JSON of one
    process to 1e-9 relative (FD_TOL: the FDs here sit at singular sample covariances, 50 samples of 64 digits
    features and near-constant 1-step samples, where the summation order moves them by up to ~6e-10 relative);
    rank 0 alone prints."""
    args = ["-m", "scm_graph.eval", "--ckpt", str(sct_ckpt), "--metric", "fd_digits", "fd_dinov2", "--dinov2", str(dinov2_repo),
            "--ref", str(dinov2_ref[0]), "--n", "50", "--batch", "8", "--json", "--steps", "1", "2", "--device", "cpu"]
    rows = {}
    for procs in (1, 2):
        res = _run(_torchrun(*args, n=procs) if procs > 1 else [sys.executable, *args])
        rows[procs] = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
        assert len(rows[procs]) == 2, res.stdout
    for one, two in zip(rows[1], rows[2], strict=True):
        assert {k: one[k] for k in ("sampler", "steps", "nfe", "n")} == {k: two[k] for k in ("sampler", "steps", "nfe", "n")}
        for key in ("fd", "fd_dinov2"):
            assert two[key] == pytest.approx(one[key], **FD_TOL) and one[key] > 0, key


@pytest.mark.slow
def test_torchrun_ref_equals_one_process(tmp_path: Path, shard_root: Path, dinov2_repo: Path):
    """`eval ref --shards` on 2 gloo processes writes the arrays one process writes, to 1e-10; rank 0 alone writes."""
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"refs{procs}.npz"
        args = ["-m", "scm_graph.eval", "ref", "--shards", str(shard_root / "digits"), "--out", str(out), "--metric", "fd_dinov2",
                "--dinov2", str(dinov2_repo), "--n", "250", "--batch", "32", "--device", "cpu"]
        res = _run(_torchrun(*args, n=procs) if procs > 1 else [sys.executable, *args])
        assert res.stdout.count("wrote") == 1, res.stdout
        with np.load(out, allow_pickle=False) as z:
            outs[procs] = {k: z[k] for k in z.files}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs1.npz", "refs2.npz"]
    assert outs[1].keys() == outs[2].keys() == {"source", "fd_dinov2_mu", "fd_dinov2_sigma", "fd_dinov2_n"}
    assert str(outs[1]["source"]) == str(outs[2]["source"]) and int(outs[2]["fd_dinov2_n"]) == 250
    for key in ("fd_dinov2_mu", "fd_dinov2_sigma"):
        assert _rel(outs[2][key], outs[1][key]) < REL, key
