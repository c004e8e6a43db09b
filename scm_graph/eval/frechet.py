"""Frechet distance between Gaussian fits of two feature sets: the metric behind FID, FD_DINOv2 and digits FD.

FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scm_graph.errors import UserError


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian moments of a feature set: mean [d], unbiased covariance [d, d], sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @staticmethod
    def of(features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise UserError(f"features must be [N, d], got shape {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise UserError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
        if not np.isfinite(f).all():
            raise UserError("features contain non-finite values")
        mu = f.mean(axis=0)
        sigma = np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])  # S = X_c^T X_c / (N-1)
        return FeatureStats(mu=mu, sigma=sigma, n=int(f.shape[0]))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (tiny negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S^{1/2} = V diag(sqrt(w)) V^T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FD between Gaussians N(mu_a, S_a), N(mu_b, S_b), in float64."""
    mu_a, mu_b = np.asarray(a.mu, np.float64), np.asarray(b.mu, np.float64)
    s_a, s_b = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or s_a.shape != (d, d) or s_b.shape != (d, d):
        raise UserError(f"feature stats disagree in shape: {mu_a.shape}/{s_a.shape} vs {mu_b.shape}/{s_b.shape}")
    for arr in (mu_a, mu_b, s_a, s_b):
        if not np.isfinite(arr).all():
            raise UserError("feature stats contain non-finite values")
    ra = _psd_sqrt(s_a)
    m = ra @ s_b @ ra  # S_a^{1/2} S_b S_a^{1/2}: symmetric PSD, same spectrum as S_a S_b
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)
    tr_covmean = float(np.sqrt(ev).sum())  # tr((S_a S_b)^{1/2}) = sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))
    diff = mu_a - mu_b
    fd = float(diff @ diff) + float(np.trace(s_a) + np.trace(s_b)) - 2.0 * tr_covmean  # ||dmu||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})
    return max(fd, 0.0)
