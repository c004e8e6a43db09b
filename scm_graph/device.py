"""Which device a run, a sampler or a benchmark uses."""

from __future__ import annotations

import torch

from scm_graph.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (cuda if present), 'cpu' or 'cuda[:i]'; one-line UserError for a bad or absent device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"bad device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available")
    return dev
