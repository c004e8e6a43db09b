"""Reference statistics files (.npz): ours, one file for several metrics, or clean-fid's, for FID.

Ours holds `<metric>_mu`, `<metric>_sigma` and `<metric>_n` for each metric it covers, plus `source` (what the
statistics were computed from). clean-fid's published files (e.g. `cifar10_clean_train_32.npz`) hold `mu` and
`sigma` of its Inception features in mode "clean": loaded as `fid` statistics. Loaded with
`allow_pickle=False`, so a file cannot run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from scm_graph.errors import UserError
from scm_graph.eval.frechet import FeatureStats
from scm_graph.paths import write_atomic


def save_refs(path: str | Path, stats: dict[str, FeatureStats], source: str) -> None:
    """Write `stats` to `path` whole or not at all (scm_graph.paths.write_atomic)."""
    arrays: dict[str, np.ndarray] = {"source": np.array(source)}
    for metric, s in stats.items():
        arrays.update({f"{metric}_mu": s.mu, f"{metric}_sigma": s.sigma, f"{metric}_n": np.array(s.n)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_refs(path: str | Path, metrics: list[str] | tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, FeatureStats]:
    """The statistics of each of `metrics` in `path`; a one-line UserError when the file lacks one. Those of
    `optional` only where the file holds them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics {path} not found (make them with: python -m scm_graph.eval ref --shards DIR --out {path})")
    if not zipfile.is_zipfile(path):
        raise UserError(f"reference statistics {path} are not a .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise UserError(f"cannot read reference statistics {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    out: dict[str, FeatureStats] = {}
    held = [m for m in optional if f"{m}_mu" in arrays and f"{m}_sigma" in arrays]
    for metric in [*metrics, *held]:
        if f"{metric}_mu" in arrays and f"{metric}_sigma" in arrays:
            mu, sigma, n = arrays[f"{metric}_mu"], arrays[f"{metric}_sigma"], int(arrays.get(f"{metric}_n", np.array(0)))
        elif metric == "fid" and "mu" in arrays and "sigma" in arrays:  # clean-fid's file
            mu, sigma, n = arrays["mu"], arrays["sigma"], 0
        else:
            have = sorted({k[: -len("_mu")] for k in arrays if k.endswith("_mu") and f"{k[: -len('_mu')]}_sigma" in arrays}
                          | ({"fid"} if "mu" in arrays and "sigma" in arrays else set()))
            raise UserError(f"reference statistics {path} hold no {metric} statistics (they hold: {', '.join(have) or 'none'})")
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"reference statistics {path}: {metric} has mean {mu.shape} and covariance {sigma.shape}")
        out[metric] = FeatureStats(mu=mu, sigma=sigma, n=n)
    return out
