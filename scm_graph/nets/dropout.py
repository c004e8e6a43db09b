"""Dropout whose mask is a pure function of an explicit integer key.

Torch's RNG gives different masks eagerly and inside torch.compile, and would give the JVP pass
(theta^-) and the gradient pass (theta) of one sCT step different masks; Algorithm 1 needs the same
network function in both. A counter-based hash of (key, salt, element index) gives the same mask
everywhere. The train loop draws one key per step; each dropout layer has its own salt.

The element index counts from the first sample of the *global* batch: a process or micro-batch that
holds samples i0.. of it passes the key as [key, i0], so a batch split any way gets the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """murmur3 fmix32 on int64 holding uint32 values (low bits survive int64 wrap-around)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keyed_uniform(shape: torch.Size, key: Tensor, salt: int | Tensor, device: torch.device) -> Tensor:
    """Counter-based uniforms in [0, 1): a pure function of (key, salt, element index); `key` is [] or
    [key, i0] (element indices offset by sample i0 of the global batch). All 64 bits of the key count
    (the high 32 hold the run seed, so two seeds never share a step's mask by construction).

    Unlike torch's RNG this gives the same numbers eagerly and inside torch.compile, and the same
    numbers for the JVP pass (theta^-) and the gradient pass (theta) of one train step.
    """
    n = 1
    for s in shape:
        n *= s
    key = key.to(device=device, dtype=torch.int64)
    if isinstance(salt, Tensor):  # KeyedDropout's buffer
        salt = salt.to(device=device, dtype=torch.int64)
    idx = torch.arange(n, device=device, dtype=torch.int64).reshape(shape)
    if key.ndim == 1:  # [key, i0]: this batch is samples i0.. of the step's global batch
        key, first = key[0], key[1]
        idx = idx + first * (n // shape[0])  # the element's index in the global batch
    lo, hi = key & _M32, key >> 32  # the train loop's keys: (run seed << 32) + step
    seed = _mix32((lo * 0x9E3779B1 + salt) & _M32) ^ _mix32((hi * 0x85EBCA77) & _M32)  # hi = 0: as before
    h = _mix32((idx ^ seed) & _M32)
    h = _mix32((h + seed * 0x27D4EB2F) & _M32)
    return h.to(torch.float32) * (1.0 / 4294967296.0)


class KeyedDropout(nn.Module):
    """Dropout whose mask is a function of an explicit integer key (see keyed_uniform).

    The salt is a tensor (a buffer, not saved: the network's structure sets it), so that it reaches a compiled graph
    as an input rather than a constant: the mask kernels of equally shaped layers then have the same source, and
    Inductor builds each once (digits_sct's first compiled step: 38 forward kernels -> 30, 88 s -> 82 s on 2 cores,
    docs/bench_step_cpu.md). The masks are the same as with a Python int.
    """

    def __init__(self, p: float, salt: int):
        super().__init__()
        self.p = p
        self.register_buffer("salt", torch.tensor(salt, dtype=torch.int64), persistent=False)

    def forward(self, x: Tensor, key: Tensor | None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if key is None:
            return F.dropout(x, self.p, training=True)
        keep = keyed_uniform(x.shape, key, self.salt, x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))
