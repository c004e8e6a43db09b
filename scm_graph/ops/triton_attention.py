"""Triton kernels: attention forward + JVP in one pass over K/V blocks, and the flash backward.

Forward + JVP (sCM Sec. 5.1; docs/design.md, "The JVP of attention"). Per query row the kernel keeps, in float32,
    m = running max of S,  l = sum e^(S-m),  A = sum e^(S-m) V_j,
    B = sum e^(S-m) (dS_ij V_j + dV_j),  c = sum e^(S-m) dS_ij,
rescales all of them when m grows, and ends with O = A/l, mu = c/l, dO = B/l - mu O, LSE = m + log l.
Six matmuls per K/V block (12 N^2 D flops per head), O(N) memory. Without tangents the same kernel
is a plain flash forward that also writes the LSE.

Backward (FlashAttention-2 style): P is recomputed from the LSE; one kernel per K/V block
accumulates dK, dV over query blocks, one per query block accumulates dQ; no atomics.

Layout: contiguous (batch, heads, seq, head_dim); head_dim <= 256, padded to a power of two.
Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST: the interpreter's bf16 dot is wrong, so go via fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_tile(PTR, bh, rows, n, offs_d, D: tl.constexpr):
    """Rows `rows` of one (batch, head) slice of an [n, D] tensor, zero outside; also offsets and mask."""
    off = bh * n * D + rows[:, None] * D + offs_d[None, :]
    mask = (rows < n)[:, None] & (offs_d < D)[None, :]
    return tl.load(PTR + off, mask=mask, other=0.0), off, mask


@triton.jit
def _fwd_kernel(
    Q, K, V, DQ, DK, DV, O, DO, LSE,
    scale, Nq, Nk,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_T: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, q_off, q_mask = _row_tile(Q, bh, rows, Nq, offs_d, D)
    qk_scale = scale * 1.4426950408889634  # S in log2 units, so exp2 can be used

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_T:
        dq, _dq_off, _dq_mask = _row_tile(DQ, bh, rows, Nq, offs_d, D)  # own names: a loop-carried `_` must keep one shape
        acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        c_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, _, _ = _row_tile(K, bh, cols, Nk, offs_d, D)
        v, _, _ = _row_tile(V, bh, cols, Nk, offs_d, D)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale  # S = scale Q K^T (log2 units)
        s = tl.where((cols < Nk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales everything accumulated under the old max
        p = tl.exp2(s - m_new[:, None])  # e^(S - m)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_a = acc_a * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)  # A += e^(S-m) V
        if HAS_T:
            dk, _, _ = _row_tile(DK, bh, cols, Nk, offs_d, D)
            dv, _, _ = _row_tile(DV, bh, cols, Nk, offs_d, D)
            ds = (_dot(dq, tl.trans(k), UPCAST, IEEE) + _dot(q, tl.trans(dk), UPCAST, IEEE)) * scale  # dS = scale (dQ K^T + Q dK^T)
            pds = p * ds
            c_i = c_i * alpha + tl.sum(pds, 1)  # c += e^(S-m) dS
            acc_b = acc_b * alpha[:, None] + _dot(pds.to(v.dtype), v, UPCAST, IEEE) + _dot(p.to(v.dtype), dv, UPCAST, IEEE)  # B += e^(S-m) (dS V + dV)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty row (no keys) gives O = dO = 0, never NaN
    o = acc_a / l_safe[:, None]  # O = A / l
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # LSE = m + log l (natural log)
    tl.store(LSE + bh * Nq + rows, lse, mask=rows < Nq)
    if HAS_T:
        mu = c_i / l_safe  # mu = c / l
        do = acc_b / l_safe[:, None] - mu[:, None] * o  # dO = B / l - mu O
        tl.store(DO + q_off, do.to(DO.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_p_ds(q, k, v, g, lse2, delta, valid, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """P recomputed from the LSE (log2 units) and dS = P (dO V^T - Delta) for one [M, N] tile."""
    p = tl.exp2(_dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale - lse2[:, None])  # P = exp(S - LSE)
    p = tl.where(valid, p, 0.0)
    dp = _dot(g, tl.trans(v), UPCAST, IEEE)  # dP = dO V^T
    return p, p * (dp - delta[:, None])  # dS = P (dP - Delta)


@triton.jit
def _bwd_pt_dst(q, k, v, g, lse2, delta, valid_t, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """P^T and dS^T for one [N, M] tile, computed transposed (K Q^T, V dO^T) rather than transposing P and dS: the
    dK / dV products then take no register transpose of a dot's result (see the note at _bwd_dkdv_kernel)."""
    p_t = tl.exp2(_dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale - lse2[None, :])  # P^T = exp(S^T - LSE)
    p_t = tl.where(valid_t, p_t, 0.0)
    dp_t = _dot(v, tl.trans(g), UPCAST, IEEE)  # dP^T = V dO^T
    return p_t, p_t * (dp_t - delta[None, :])  # dS^T = P^T (dP^T - Delta)


# dK and dV take P^T and dS^T computed transposed, as Triton's fused-attention tutorial does. Found on an H100
# (Triton 3.6, fp16, head dim 128, the (32, 64, 2-stage) config): with tl.trans(dS) of the tile computed as in the dQ
# kernel, dK was off by 1.5e-2 (relative Frobenius norm; the float64 reference, with the fp16 rounding of inputs and
# of dS, gives 5e-4), while dQ, which takes dS untransposed, and head dims 32 to 80 passed; Triton has had this
# pattern (a dot's result transposed into another dot) miscompile on Hopper before (triton-lang/triton#6124).
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, G, LSE, DELTA, DK, DV,
    scale, Nq, Nk,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, kv_off, kv_mask = _row_tile(K, bh, cols, Nk, offs_d, D)
    v, _v_off, _v_mask = _row_tile(V, bh, cols, Nk, offs_d, D)  # own names: a loop-carried `_` must keep one shape
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q, _, _ = _row_tile(Q, bh, rows, Nq, offs_d, D)
        g, _, _ = _row_tile(G, bh, rows, Nq, offs_d, D)
        lse2 = tl.load(LSE + bh * Nq + rows, mask=rows < Nq, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Nq + rows, mask=rows < Nq, other=0.0)
        valid_t = (cols < Nk)[:, None] & (rows < Nq)[None, :]
        p_t, ds_t = _bwd_pt_dst(q, k, v, g, lse2, delta, valid_t, scale * 1.4426950408889634, UPCAST, IEEE)
        dv += _dot(p_t.to(g.dtype), g, UPCAST, IEEE)  # dV = P^T dO
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)  # dK = scale dS^T Q (scale below)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, G, LSE, DELTA, DQ,
    scale, Nq, Nk,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, q_off, q_mask = _row_tile(Q, bh, rows, Nq, offs_d, D)
    g, _g_off, _g_mask = _row_tile(G, bh, rows, Nq, offs_d, D)  # own names: a loop-carried `_` must keep one shape
    lse2 = tl.load(LSE + bh * Nq + rows, mask=rows < Nq, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Nq + rows, mask=rows < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, _, _ = _row_tile(K, bh, cols, Nk, offs_d, D)
        v, _, _ = _row_tile(V, bh, cols, Nk, offs_d, D)
        valid = (rows < Nq)[:, None] & (cols < Nk)[None, :]
        _, ds = _bwd_p_ds(q, k, v, g, lse2, delta, valid, scale * 1.4426950408889634, UPCAST, IEEE)
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)  # dQ = scale dS K (scale below)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# -------------------------------------------------------------------------------------------------
# Launch configurations: fixed small blocks in the interpreter, autotuned on the GPU.
# (BLOCK_M, BLOCK_N, warps, pipeline stages). The first six are the fast ones at 16-bit and head dim <= 64; the shared
# memory a config needs grows with the stages, the blocks, BLOCK_D and the element size, and Triton's autotuner drops
# a config that does not fit. The last two are there so that one always fits: on an H100 (227 KB) no config among
# the first six fits the fp32 forward at BLOCK_D 128 (264 to 448 KB for sm_90, measured by compiling them), while
# (64, 32, 4, 2) needs 136 KB there; (32, 32, 4, 1) needs at most 136 KB at fp32 and 80 KB at 16-bit up to BLOCK_D
# 256 (an A100 has 163 KB, an RTX 4090 99 KB; Triton 3.9's sm_90 compile). tests/ops/test_attention_lowering.py
# compiles them to check.
_GPU_BLOCKS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2), (64, 128, 4, 2),
               (64, 32, 4, 2), (32, 32, 4, 1)]


def _gpu_configs(fwd: bool) -> list[triton.Config]:
    out = []
    for bm, bn, w, s in _GPU_BLOCKS:
        if not fwd:
            bm, bn = bn, bm  # backward: the outer block is a K/V block
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


_KEY = ["Nq", "Nk", "BLOCK_D"]
_fwd_tuned = triton.autotune(_gpu_configs(True), key=[*_KEY, "HAS_T"])(_fwd_kernel)
_dkdv_tuned = triton.autotune(_gpu_configs(False), key=_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_gpu_configs(True), key=_KEY)(_bwd_dq_kernel)
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _flags(x: Tensor) -> dict:
    return {"UPCAST": INTERPRET, "IEEE": x.dtype == torch.float32}


def _launch(tuned, plain, grid_axis: str, n: int, bh: int, args: tuple, **const) -> None:
    if INTERPRET:
        plain[(triton.cdiv(n, _INTERPRET_BLOCKS[grid_axis]), bh)](*args, **const, **_INTERPRET_BLOCKS)
    else:
        tuned[lambda meta: (triton.cdiv(n, meta[grid_axis]), bh)](*args, **const)


def _prep(*xs: Tensor) -> list[Tensor]:
    d = xs[0].shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head_dim <= {MAX_HEAD_DIM}, got {d}")
    return [x.contiguous() for x in xs]


def fwd_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """(O, dO, LSE); with all tangents None, (O, None, LSE) from the same kernel without the JVP."""
    has_t = dq is not None
    q, k, v = _prep(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if has_t:
        dq, dk, dv = _prep(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    o = torch.empty_like(q)
    do = torch.empty_like(q) if has_t else o
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if B * H * Nq == 0:
        return o, (do if has_t else None), lse
    args = (q, k, v, dq if has_t else q, dk if has_t else k, dv if has_t else v, o, do, lse, scale, Nq, Nk)
    block_d = max(16, triton.next_power_of_2(D))
    _launch(_fwd_tuned, _fwd_kernel, "BLOCK_M", Nq, B * H, args, D=D, BLOCK_D=block_d, HAS_T=has_t, **_flags(q))
    return o, (do if has_t else None), lse


def bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) of <grad_o, O> from the saved O and LSE."""
    q, k, v, grad_o = _prep(q, k, v, grad_o.to(q.dtype))
    lse = lse.float().contiguous()
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = (grad_o.float() * o.float()).sum(-1).contiguous()  # Delta_i = sum_d dO_id O_id
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * Nq * Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = max(16, triton.next_power_of_2(D))
    const = dict(D=D, BLOCK_D=block_d, **_flags(q))
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, "BLOCK_N", Nk, B * H, (q, k, v, grad_o, lse, delta, dk, dv, scale, Nq, Nk), **const)
    _launch(_dq_tuned, _bwd_dq_kernel, "BLOCK_M", Nq, B * H, (q, k, v, grad_o, lse, delta, dq, scale, Nq, Nk), **const)
    return dq, dk, dv
