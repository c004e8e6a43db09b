"""Digits FD: the Frechet distance in the feature space of a small digits classifier.

The analogue of FID for 8x8 digits. The classifier is trained deterministically in seconds on CPU and
cached as safetensors under `cache_dir`, `$SCM_GRAPH_CACHE` or `~/.cache/scm_graph/`, in a file whose
name holds a hash of the training recipe (a recipe change retrains). Training is bitwise reproducible
for a fixed torch build and thread count; other thread counts change the weights in the last bits
(FD values then agree to ~1e-4 relative).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scm_graph.data.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.eval.frechet import FeatureStats, frechet_distance

# Everything that changes the trained weights; its hash names the cache file.
RECIPE: dict[str, object] = {
    "version": "digits-cnn-v1",
    "arch": "relu-conv16-relu-conv32-maxpool-silu-fc64-fc10",
    "seed": 0,
    "split": "torch-randperm-seed0-1500-train",
    "n_train": 1500,
    "steps": 600,
    "batch": 64,
    "lr": 1e-3,
    "lr_schedule": "cosine-to-0",
    "augment": "random-1px-shift",
}
FEATURE_DIM = 64


def recipe_hash() -> str:
    """Short stable hash of RECIPE (the cache key)."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """Small CNN on [N, 1, 8, 8] inputs in [-1, 1]; `features` are the 64 penultimate activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)
        self.heldout_accuracy: float = float("nan")
        self.loaded_from_cache: bool = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8x8 -> 4x4
        return F.silu(self.fc1(h.flatten(1)))  # SiLU: no dead feature units (ReLU left ~half dead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _scale(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.to(torch.float32) / 127.5 - 1.0  # x in [0, 255] -> x / 127.5 - 1 in [-1, 1]


def _shift_1px(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by -1/0/+1 pixel per axis per sample; background (-1) fills the gap."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    off = torch.randint(0, 3, (b, 2), generator=g)
    ar = torch.arange(8)
    rows = (off[:, 0:1] + ar)[:, :, None]  # [B, 8, 1]
    cols = (off[:, 1:2] + ar)[:, None, :]  # [B, 1, 8]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def train_digits_classifier() -> DigitsClassifier:
    """Train per RECIPE (deterministic); sets `heldout_accuracy`; returns the model in eval mode."""
    images, labels = load_digits_uint8()
    x_all, y_all = _scale(torch.from_numpy(images)), torch.from_numpy(labels)
    n_train, steps, batch = int(RECIPE["n_train"]), int(RECIPE["steps"]), int(RECIPE["batch"])
    was_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(RECIPE["seed"]))
            g = torch.Generator().manual_seed(int(RECIPE["seed"]))
            perm = torch.randperm(x_all.shape[0], generator=g)
            tr, te = perm[:n_train], perm[n_train:]
            model = DigitsClassifier()
            opt = torch.optim.Adam(model.parameters(), lr=float(RECIPE["lr"]))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            model.train()
            order = torch.empty(0, dtype=torch.long)
            for _ in range(steps):
                if order.numel() < batch:  # next epoch: a fresh seeded permutation of the train split
                    order = torch.cat([order, tr[torch.randperm(n_train, generator=g)]])
                idx, order = order[:batch], order[batch:]
                xb = _shift_1px(x_all[idx], g)
                loss = F.cross_entropy(model(xb), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            model.eval()
            with torch.no_grad():
                pred = model(x_all[te]).argmax(1)
            model.heldout_accuracy = float((pred == y_all[te]).float().mean())
    finally:
        torch.use_deterministic_algorithms(was_det)
    return model


def _cache_path(cache_dir: str | Path | None) -> Path:
    root = cache_dir if cache_dir is not None else os.environ.get("SCM_GRAPH_CACHE") or Path.home() / ".cache" / "scm_graph"
    return Path(root).expanduser() / f"digits_classifier_{recipe_hash()}.safetensors"


def _save_atomic(model: DigitsClassifier, path: Path, meta: dict[str, str]) -> None:
    """Write safetensors to a temp file in the same folder, then os.replace (atomic on POSIX)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is a plain shared file
        os.replace(tmp, path)  # readers see the old file or the complete new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def digits_classifier(cache_dir: str | Path | None = None, use_cache: bool = True) -> DigitsClassifier:
    """The trained digits classifier (eval mode), loaded from / saved to the safetensors cache."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _cache_path(cache_dir)
    if use_cache and path.is_file():
        try:
            model = DigitsClassifier()
            model.load_state_dict(load_file(str(path)))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            model.heldout_accuracy = float(meta.get("heldout_accuracy", "nan"))
            model.loaded_from_cache = True
            return model.eval()
        except Exception:  # unreadable/stale cache file: retrain and overwrite it
            pass
    t0 = time.perf_counter()
    model = train_digits_classifier()
    train_s = time.perf_counter() - t0
    if use_cache:
        meta = {
            "recipe": json.dumps(RECIPE, sort_keys=True),
            "recipe_hash": recipe_hash(),
            "heldout_accuracy": repr(model.heldout_accuracy),
            "train_seconds": f"{train_s:.3f}",
            "torch": torch.__version__,
        }
        try:
            _save_atomic(model, path, meta)
        except OSError as e:  # an unwritable cache only costs a retrain next time
            warnings.warn(f"could not cache the digits classifier at {path}: {e}", stacklevel=2)
    return model


# ----------------------------------------------------------------------------- features and FD

_MODELS: dict[str, DigitsClassifier] = {}
_REAL_FEATURES: dict[str, np.ndarray] = {}
_REAL_STATS: dict[str, FeatureStats] = {}


def _default_model() -> tuple[str, DigitsClassifier]:
    key = str(_cache_path(None))
    if key not in _MODELS:
        _MODELS[key] = digits_classifier()
    return key, _MODELS[key]


def _as_images(images: torch.Tensor | np.ndarray, min_n: int = 1) -> torch.Tensor:
    """Validate [N, 1, 8, 8] images in 0..255 units; return float32 CPU tensor clamped to [0, 255]."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise UserError(f"digits images must be [N, 1, 8, 8], got shape {tuple(x.shape)}")
    if x.shape[0] < min_n:
        raise UserError(f"need at least {min_n} images, got {x.shape[0]}")
    x = x.to(torch.float64 if x.is_floating_point() else torch.float32)
    if not torch.isfinite(x).all():
        raise UserError("digits images contain non-finite values")
    return x.clamp(0.0, 255.0).to(torch.float32)


def _apply(images: torch.Tensor | np.ndarray, model: DigitsClassifier | None, fn, batch: int) -> list[torch.Tensor]:
    """`fn(model, scaled images)` over batches of images in 0..255 units, on the CPU."""
    x = _as_images(images)
    if model is None:
        model = _default_model()[1]
    dev = next(model.parameters()).device
    with torch.no_grad():
        return [fn(model, _scale(x[i : i + batch]).to(dev)).cpu() for i in range(0, x.shape[0], batch)]


def digits_features(
    images: torch.Tensor | np.ndarray, model: DigitsClassifier | None = None, batch: int = 2048
) -> np.ndarray:
    """Penultimate classifier features (float64 [N, 64]) of images in 0..255 units."""
    out = _apply(images, model, lambda m, x: m.features(x).to(torch.float64), batch)
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def digits_predictions(
    images: torch.Tensor | np.ndarray, model: DigitsClassifier | None = None, batch: int = 2048
) -> np.ndarray:
    """The classifier's predicted class (int64 [N]) of images in 0..255 units."""
    out = _apply(images, model, lambda m, x: m(x).argmax(1), batch)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0,), np.int64)


def _real_features() -> np.ndarray:
    key, model = _default_model()
    if key not in _REAL_FEATURES:
        _REAL_FEATURES[key] = digits_features(load_digits_uint8()[0], model)
    return _REAL_FEATURES[key]


def real_digits_stats() -> FeatureStats:
    """Feature stats of all 1797 real digits (cached in-process)."""
    key = _default_model()[0]
    if key not in _REAL_STATS:
        _REAL_STATS[key] = FeatureStats.of(_real_features())
    return _REAL_STATS[key]


def digits_fd(images: torch.Tensor | np.ndarray) -> float:
    """FD of generated images (0..255 units, [N, 1, 8, 8], N >= 2) vs all real digits."""
    x = _as_images(images, min_n=2)
    return frechet_distance(FeatureStats.of(digits_features(x)), real_digits_stats())


def digits_floor_fd(seed: int = 0) -> float:
    """FD between two random halves of the real digits: the best a sample set of ~900 can score."""
    f = _real_features()
    perm = np.random.default_rng(seed).permutation(f.shape[0])
    h = f.shape[0] // 2
    return frechet_distance(FeatureStats.of(f[perm[:h]]), FeatureStats.of(f[perm[h:]]))


class DigitsFeatures:
    """The `fd_digits` feature network (scm_graph.eval.features): the classifier's 64 penultimate features."""

    metric, dim = "fd_digits", FEATURE_DIM

    def __init__(self) -> None:
        self.model = _default_model()[1]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(digits_features(images, self.model))
