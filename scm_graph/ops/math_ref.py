"""Attention, its JVP and its backward in plain PyTorch: the CPU fallback and the kernels' reference.

The formulas are the ones the Triton kernels implement (sCM Sec. 5.1), written out explicitly rather
than obtained by autograd, and evaluated in chunks of query rows so memory stays O(chunk x N_k).
Tensors are (batch, heads, seq, head_dim); arithmetic runs in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1024  # query rows per chunk


def acc(x: Tensor) -> Tensor:
    """The arithmetic's dtype: float32, float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def fwd_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """Return (O, dO, LSE); dO is None when all tangents are None. O, dO in q's dtype, LSE in float32."""
    has_t = dq is not None
    k32, v32 = acc(k), acc(v)
    dk32, dv32 = (acc(dk), acc(dv)) if has_t else (None, None)
    os, dos, lses = [], [], []
    for i in range(0, q.shape[-2], CHUNK):
        q32 = acc(q[..., i : i + CHUNK, :])
        s = scale * q32 @ k32.transpose(-1, -2)  # S = scale Q K^T
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])  # P = softmax(S)
        o = p @ v32  # O = P V
        os.append(o.to(q.dtype))
        lses.append(lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32))
        if has_t:
            dq32 = acc(dq[..., i : i + CHUNK, :])
            ds = scale * (dq32 @ k32.transpose(-1, -2) + q32 @ dk32.transpose(-1, -2))  # dS = scale (dQ K^T + Q dK^T)
            mu = (p * ds).sum(-1, keepdim=True)  # mu_i = sum_j P_ij dS_ij
            do = (p * (ds - mu)) @ v32 + p @ dv32  # dO_i = sum_j P_ij (dS_ij - mu_i) V_j + P_ij dV_j
            dos.append(do.to(q.dtype))
    o = torch.cat(os, dim=-2)
    lse = torch.cat(lses, dim=-1)
    return o, (torch.cat(dos, dim=-2) if has_t else None), lse


def bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_o * O) w.r.t. (Q, K, V) from the saved LSE (flash-attention backward)."""
    k32, v32 = acc(k), acc(v)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k32)
    dv = torch.zeros_like(v32)
    for i in range(0, q.shape[-2], CHUNK):
        sl = slice(i, i + CHUNK)
        q32, g32, o32 = acc(q[..., sl, :]), acc(grad_o[..., sl, :]), acc(o[..., sl, :])
        p = torch.exp(scale * q32 @ k32.transpose(-1, -2) - lse[..., sl, None].to(q32.dtype))  # P from the LSE
        delta = (g32 * o32).sum(-1, keepdim=True)  # D_i = sum_d dO_id O_id = sum_j P_ij dP_ij
        dv += p.transpose(-1, -2) @ g32  # dV = P^T dO
        ds = p * (g32 @ v32.transpose(-1, -2) - delta)  # dS = P (dP - D)
        dq[..., sl, :] = (scale * ds @ k32).to(q.dtype)  # dQ = scale dS K
        dk += scale * ds.transpose(-1, -2) @ q32  # dK = scale dS^T Q
    return dq, dk.to(k.dtype), dv.to(v.dtype)
