"""Streaming Gaussian moments of features: float64 sums that batches add to and processes merge.

n, s = sum_i f_i and S = sum_i f_i f_i^T are exact sums, so the order batches arrive in (or which process
saw them) changes the result only by float64 rounding; torchrun ranks all-reduce the three sums. The
raw-sum covariance loses digits when the features' mean is far larger than their spread (1e5 : 1 costs
about 10 of float64's 16 digits); network features are nowhere near that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scm_graph.errors import UserError
from scm_graph.eval.frechet import FeatureStats


@dataclass
class Moments:
    """Sums of a growing feature set: count n, s = sum f [d], S = sum f f^T [d, d] (float64)."""

    n: int
    s: np.ndarray
    S: np.ndarray

    @staticmethod
    def empty(dim: int) -> Moments:
        return Moments(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @property
    def dim(self) -> int:
        return int(self.s.shape[0])

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [N, d] (any float dtype; summed in float64)."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise UserError(f"features must be [N, {self.dim}], got shape {tuple(f.shape)}")
        if not np.isfinite(f).all():
            raise UserError("the feature network returned non-finite values")
        self.n += int(f.shape[0])
        self.s += f.sum(axis=0)
        self.S += f.T @ f

    def merge(self, other: Moments) -> Moments:
        if other.dim != self.dim:
            raise UserError(f"cannot merge moments of {self.dim} and {other.dim} features")
        return Moments(self.n + other.n, self.s + other.s, self.S + other.S)

    def all_reduce(self) -> Moments:
        """The sums over every process of a torch.distributed job (float64 all-reduce; a no-op without one)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = torch.from_numpy(np.concatenate([[float(self.n)], self.s, self.S.ravel()])).to(backend_device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        d = self.dim
        return Moments(round(float(flat[0])), flat[1 : 1 + d].copy(), flat[1 + d :].reshape(d, d).copy())

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance: mu = s / n, Sigma = (S - n mu mu^T) / (n - 1)."""
        if self.n < 2:
            raise UserError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.s / self.n  # mu = (1/n) sum f
        sigma = (self.S - self.n * np.outer(mu, mu)) / (self.n - 1)  # Sigma = (sum f f^T - n mu mu^T) / (n - 1)
        return FeatureStats(mu=mu, sigma=(sigma + sigma.T) / 2, n=self.n)
