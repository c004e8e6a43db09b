"""Frechet distance vs closed forms, the digits classifier (accuracy, determinism, cache), FD sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scm_graph.eval import digits as fd
from scm_graph.data.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.eval.frechet import FeatureStats, frechet_distance


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------- frechet_distance


def test_feature_stats_of_matches_numpy():
    f = np.random.default_rng(0).standard_normal((50, 4)) + np.array([3.0, -1.0, 0.5, 10.0])
    s = FeatureStats.of(f)
    assert s.n == 50 and s.mu.dtype == np.float64 and s.sigma.shape == (4, 4)
    n, d = f.shape
    mu = np.array([sum(f[i, j] for i in range(n)) / n for j in range(d)])  # mu_j = (1/N) sum_i x_ij
    xc = f - mu  # X_c = X - 1 mu^T
    cov = np.array([[sum(xc[i, j] * xc[i, k] for i in range(n)) / (n - 1) for k in range(d)] for j in range(d)])  # S = X_c^T X_c / (N - 1)
    np.testing.assert_allclose(s.mu, mu, rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.sigma, cov, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.mu, f.mean(0))
    np.testing.assert_allclose(s.sigma, np.cov(f, rowvar=False, ddof=1))
    with pytest.raises(UserError, match="at least 2 samples"):
        FeatureStats.of(f[:1])
    with pytest.raises(UserError, match="non-finite"):
        FeatureStats.of(np.full((3, 2), np.nan))


def test_fd_identical_is_zero():
    rng = np.random.default_rng(1)
    s = FeatureStats(rng.standard_normal(16), _random_spd(rng, 16), 100)
    assert abs(frechet_distance(s, s)) < 1e-8


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(2)
    d = 10
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(FeatureStats(mu1, np.diag(s1), 2), FeatureStats(mu2, np.diag(s2), 2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fd_commuting_closed_form():
    rng = np.random.default_rng(3)
    d = 12
    q = _random_orthogonal(rng, d)
    l1, l2 = rng.uniform(0.05, 4, d), rng.uniform(0.05, 4, d)
    l1[:2] = 0.0  # singular (PSD) covariance is fine too
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a = FeatureStats(mu1, q @ np.diag(l1) @ q.T, 2)
    b = FeatureStats(mu2, q @ np.diag(l2) @ q.T, 2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_fd_general_spd_vs_reference_and_symmetric():
    rng = np.random.default_rng(4)
    d = 20
    a = FeatureStats(rng.standard_normal(d), _random_spd(rng, d), 2)
    b = FeatureStats(0.5 * rng.standard_normal(d), 2.0 * _random_spd(rng, d), 2)
    try:
        from scipy.linalg import sqrtm

        covmean = np.real(sqrtm(a.sigma @ b.sigma))
        tr_covmean = float(np.trace(covmean))
    except ImportError:  # eigenvalues of the (non-symmetric) product are real and >= 0
        tr_covmean = float(np.sum(np.sqrt(np.clip(np.real(np.linalg.eigvals(a.sigma @ b.sigma)), 0, None))))
    ref = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean
    got = frechet_distance(a, b)
    assert got == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(got, rel=1e-10)


def test_fd_shape_mismatch_raises():
    """The errors say what is wrong: both sides' shapes, or that values are not finite."""
    rng = np.random.default_rng(5)
    with pytest.raises(UserError, match="shape") as e:
        frechet_distance(FeatureStats(np.zeros(3), np.eye(3), 2), FeatureStats(np.zeros(4), np.eye(4), 2))
    msg = str(e.value)
    assert "(3,)" in msg and "(4,)" in msg and "(3, 3)" in msg and "(4, 4)" in msg, msg
    with pytest.raises(UserError, match="shape") as e:  # the means agree, a covariance does not
        frechet_distance(FeatureStats(np.zeros(3), np.eye(3), 2), FeatureStats(np.zeros(3), np.eye(4), 2))
    assert "(3, 3)" in str(e.value) and "(4, 4)" in str(e.value), e.value
    bad = _random_spd(rng, 3)
    bad[0, 0] = np.inf
    with pytest.raises(UserError, match="non-finite"):
        frechet_distance(FeatureStats(np.zeros(3), bad, 2), FeatureStats(np.zeros(3), np.eye(3), 2))


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCM_GRAPH_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def trained(cache_dir):
    """A fresh training that writes the cache (the default dir comes from $SCM_GRAPH_CACHE)."""
    model = fd.digits_classifier()
    assert not model.loaded_from_cache
    return model


def test_classifier_accuracy_and_features(trained):
    assert trained.heldout_accuracy >= 0.95
    assert not trained.training
    x = torch.from_numpy(load_digits_uint8()[0][:10])
    f = fd.digits_features(x, trained)
    assert f.shape == (10, 64) and f.dtype == np.float64
    with torch.no_grad():
        assert trained(x.float() / 127.5 - 1).shape == (10, 10)
    # uint8 and float inputs agree; out-of-range values are clamped
    np.testing.assert_allclose(fd.digits_features(x.double(), trained), f)
    wide = x.float() * 2 - 127.5
    np.testing.assert_allclose(fd.digits_features(wide, trained), fd.digits_features(wide.clamp(0, 255), trained))


def test_classifier_cache_used(trained, cache_dir):
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors" and fd.recipe_hash() in files[0].name
    mtime = files[0].stat().st_mtime_ns
    again = fd.digits_classifier(cache_dir)
    assert again.loaded_from_cache and not again.training
    assert again.heldout_accuracy == pytest.approx(trained.heldout_accuracy)
    assert files[0].stat().st_mtime_ns == mtime
    for k, v in trained.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with open(files[0], "rb") as fh:  # safetensors, not pickle: 8-byte header length then JSON
        n = int.from_bytes(fh.read(8), "little")
        assert fh.read(n).lstrip().startswith(b"{")


def test_recipe_change_changes_cache_name(monkeypatch, tmp_path):
    before = fd._cache_path(tmp_path)
    monkeypatch.setitem(fd.RECIPE, "version", "something-else")
    assert fd._cache_path(tmp_path) != before


def test_classifier_deterministic(trained):
    other = fd.digits_classifier(use_cache=False)
    assert not other.loaded_from_cache
    for k, v in trained.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


# ----------------------------------------------------------------------------- FD sanity


@pytest.fixture(scope="module")
def digits():
    return load_digits_uint8()


def test_fd_sanity(trained, digits):
    x, y = digits
    floor = fd.digits_floor_fd(0)
    assert 0 < floor < 5
    assert fd.digits_fd(x) < 1e-6
    noise = np.random.default_rng(0).uniform(0, 255, x.shape)
    fd_noise = fd.digits_fd(noise)
    assert fd_noise > 20 * floor
    shifted = np.zeros_like(x)
    shifted[..., 2:] = x[..., :-2]
    assert fd.digits_fd(shifted) > 20 * floor
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(x.astype(np.float64), sigma=(0, 0, 1.5, 1.5))
    assert fd.digits_fd(blurred) > 20 * floor
    assert fd.digits_fd(torch.from_numpy(x[y == 0])) > 20 * floor
    # a real half vs the whole set is near the floor, not near the corruptions
    assert fd.digits_fd(x[::2]) < 2 * floor
    stats = fd.real_digits_stats()
    assert stats.n == len(x) and stats.mu.shape == (64,) and stats.sigma.shape == (64, 64)


def test_input_validation(trained, digits):
    x, _ = digits
    with pytest.raises(UserError, match="shape"):
        fd.digits_fd(x[:, 0])
    with pytest.raises(UserError, match="shape"):
        fd.digits_features(np.zeros((4, 3, 8, 8)))
    with pytest.raises(UserError, match="at least 2"):
        fd.digits_fd(x[:1])
    bad = x[:10].astype(np.float32)
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(UserError, match="non-finite"):
        fd.digits_fd(bad)
