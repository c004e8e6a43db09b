"""Stored units (uint8 0..255) <-> model units, per `DataSpec.normalize`.

'pixel': x / 127.5 - 1 (range [-1, 1]); 'channel': (x - mean) / std * sigma_d with the manifest's
per-channel statistics (std sigma_d per channel, as TrigFlow assumes).
"""

from __future__ import annotations

import torch

from scm_graph.spec import DataSpec


def _channel_stats(x: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the resolved spec, shaped [C, 1, 1] to broadcast over x."""
    c = x.shape[-3]
    if len(spec.mean) != c or len(spec.std) != c:
        raise ValueError(f"spec.data needs {c} per-channel mean/std values; resolve the spec first")
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(c, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).clamp_min(1e-6).view(c, 1, 1)
    return mean, std


def normalize(x: torch.Tensor, spec: DataSpec, sigma_d: float) -> torch.Tensor:
    """Stored units (0..255) -> model units; integer input becomes float32."""
    if not x.is_floating_point():
        x = x.float()
    if spec.normalize == "pixel":
        return x / 127.5 - 1.0
    if spec.normalize == "channel":
        mean, std = _channel_stats(x, spec)
        return (x - mean) / std * sigma_d
    raise ValueError(f"unknown normalisation {spec.normalize!r}")


def denormalize(x: torch.Tensor, spec: DataSpec, sigma_d: float) -> torch.Tensor:
    """Model units -> float stored units (inverse of normalize); the caller clamps/rounds."""
    if spec.normalize == "pixel":
        return (x + 1.0) * 127.5
    if spec.normalize == "channel":
        mean, std = _channel_stats(x, spec)
        return x / sigma_d * std + mean
    raise ValueError(f"unknown normalisation {spec.normalize!r}")
