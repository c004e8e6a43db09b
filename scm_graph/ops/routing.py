"""The one attention function every network calls, and the fused JVP op behind it.

`attention(q, k, v)` is ordinary softmax attention on (batch, heads, seq, head_dim) tensors. When it
runs under forward-mode AD (`torch.func.jvp`, eager or inside `torch.compile`), it unpacks the dual
inputs itself and calls the fused op `scm_graph::attention_jvp`, which returns O and its tangent dO
in one pass with O(N) memory, and re-packs (O, dO) as a dual tensor. Routing at the Python level
avoids two silent PyTorch traps (docs/design.md, "Traps"): Dynamo ignoring a custom autograd.Function.jvp,
and forward AD through a custom op yielding zero tangents. Outside forward AD it calls
`F.scaled_dot_product_attention`, whose fused kernels (flash on GPU) serve the gradient pass.

Backends (`SCM_ATTENTION` or `use_backend`): 'auto' runs the Triton kernels on CUDA; 'triton' forces the
kernels (on CPU only under TRITON_INTERPRET=1); 'math' forces the op's plain-PyTorch fallback. The choice
between those two is read when the op *runs*, so it applies inside compiled graphs too.

'auto' off CUDA, in training (forward AD or a gradient) and with at most PLAIN_MAX_SCORES attention scores per
layer (B x heads x Nq x Nk), calls no op: softmax attention is written out in differentiable PyTorch ops
(`plain_attention`, the fallback's float32 arithmetic). Forward AD, autograd and Inductor then see through it, and
in the CPU's two-pass sCT step the JVP's primal and the gradient pass's forward become the same operations on the
same tensors, which the compiled graph computes once, as it does for the layers before the first attention;
through the op, everything after that layer was computed three times (docs/bench_step_cpu.md: the attention
U-Net's compiled sCT step 1.85x the diffusion step -> 1.52x). The price is memory: autograd keeps the float32
scores (exp and P) of every layer for backward, O(N^2) where the op and SDPA keep O(N); the budget bounds that,
and larger layers take the op.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from scm_graph.errors import UserError
from scm_graph.ops import math_ref

BACKENDS = ("auto", "triton", "math")
# The most attention scores (B x heads x Nq x Nk) of one layer that 'auto' computes in plain ops off CUDA: 2^22 float32
# scores are 16 MiB, of which autograd keeps about three copies per layer until backward. The digits networks' layers
# hold at most 2^19 (batch 128, 64 tokens); CIFAR-10's 256-token layers at batch 128 and 4 heads hold 2^25 and take
# the op.
PLAIN_MAX_SCORES = 1 << 22
_state = {"backend": os.environ.get("SCM_ATTENTION", "auto")}

# Runtime call counts per (op, backend). Incremented when the op executes, so they also count calls
# made from compiled graphs; tests use them to prove the fused op produced the tangent.
calls: Counter[str] = Counter()


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select the attention backend ('auto', 'triton' or 'math')."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    old, _state["backend"] = _state["backend"], name
    try:
        yield
    finally:
        _state["backend"] = old


def _kernels():
    """The Triton module if it can run on these tensors' device, else None."""
    try:
        from scm_graph.ops import triton_attention
    except ImportError:
        return None
    return triton_attention


def _use_triton(x: Tensor) -> bool:
    backend = _state["backend"]
    if backend not in BACKENDS:
        raise UserError(f"SCM_ATTENTION={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "math":
        return False
    tk = _kernels() if (x.is_cuda or backend == "triton") else None
    ok = tk is not None and (x.is_cuda or (tk.INTERPRET and x.device.type == "cpu")) and x.dtype != torch.float64
    if backend == "triton" and not ok:
        raise RuntimeError("attention backend 'triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU), not float64")
    return ok


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention wants (batch, heads, seq, head_dim) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def kernels_for(x: Tensor):
    """The module whose `fwd_jvp` and `bwd` the ops run on tensors like `x` under the current backend: the Triton
    module (CUDA, or the CPU interpreter) or the math fallback `math_ref`."""
    return _kernels() if _use_triton(x) else math_ref


def _run(op: str, fn: str, *args):
    """Call `fn` of the Triton module or of the math fallback (looked up when the op runs), count it,
    and return contiguous outputs: the layout the ops' fake kernels promise."""
    impl = kernels_for(args[1] if op == "bwd" else args[0])
    calls[f"{op}:{'math' if impl is math_ref else 'triton'}"] += 1
    return tuple(x.contiguous() for x in getattr(impl, fn)(*args))


@torch.library.custom_op("scm_graph::attention_jvp", mutates_args=())
def attention_jvp_op(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(O, dO, LSE) of softmax(scale Q K^T) V along tangents (dQ, dK, dV), one fused pass."""
    return _run("jvp", "fwd_jvp", q, k, v, dq, dk, dv, scale)


@attention_jvp_op.register_fake
def _(q, k, v, dq, dk, dv, scale):
    o = q.new_empty(q.shape)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o, q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("scm_graph::attention_bwd", mutates_args=())
def attention_bwd_op(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of <grad_o, O> w.r.t. (Q, K, V) from the saved O and LSE."""
    return _run("bwd", "bwd", grad_o, q, k, v, o, lse, scale)


@attention_bwd_op.register_fake
def _(grad_o, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _, _, _, scale = inputs
    o, _, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])  # the LSE is an internal by-product


def _backward(ctx, grad_o, grad_do, grad_lse):
    # Backward of O only. A gradient through the tangent dO (second order) is not implemented, and
    # dropping it would silently give wrong gradients, so it is an error. Algorithm 1 detaches the
    # tangent; a compiled function must detach it too before returning it.
    if grad_do is not None:
        raise RuntimeError(
            "scm_graph attention: gradient through the JVP tangent dO is not implemented; detach the tangent (as Algorithm 1 does)"
        )
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        return (None,) * 7
    dq, dk, dv = attention_bwd_op(grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None, None, None, None


attention_jvp_op.register_autograd(_backward, setup_context=_setup_context)


def jvp_attention(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """O = softmax(scale Q K^T) V and its tangent dO for tangents (dQ, dK, dV); default scale 1/sqrt(D)."""
    _check(q, k, v)
    for x, d in ((q, dq), (k, dk), (v, dv)):
        if d.shape != x.shape:
            raise ValueError(f"tangent shape {tuple(d.shape)} does not match its primal {tuple(x.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # the tangents enter detached: the op has no gradient for them, and a link would keep their graph alive
    o, do, _ = attention_jvp_op(q, k, v, dq.detach().to(q.dtype), dk.detach().to(k.dtype), dv.detach().to(v.dtype), scale)
    return o, do


def plain_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(scale Q K^T) V in differentiable PyTorch ops, computed in float32 (float64 stays) as the fallback
    computes it, whatever the autocast region; the output in q's dtype."""
    region = torch.is_autocast_enabled(q.device.type)
    with torch.autocast(q.device.type, enabled=False) if region else contextlib.nullcontext():
        s = scale * (math_ref.acc(q) @ math_ref.acc(k).transpose(-1, -2))  # S = scale Q K^T
        e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())  # softmax is shift-invariant: no tangent through the max
        o = (e / e.sum(dim=-1, keepdim=True)) @ math_ref.acc(v)  # O = softmax(S) V
    return o.to(q.dtype)


def _plain(q: Tensor, k: Tensor, training: bool) -> bool:
    """'auto' off CUDA, in training, with at most PLAIN_MAX_SCORES scores in the layer: attention in plain ops."""
    small = q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2] <= PLAIN_MAX_SCORES
    return training and small and _state["backend"] == "auto" and not q.is_cuda


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale Q K^T) V; under forward AD the tangent comes from the fused JVP op (or, see the module's
    notes, from forward AD through plain ops)."""
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    (qp, dq), (kp, dk), (vp, dv) = fwAD.unpack_dual(q), fwAD.unpack_dual(k), fwAD.unpack_dual(v)
    dual = dq is not None or dk is not None or dv is not None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if _plain(q, k, dual or grad):
        return plain_attention(q, k, v, scale)
    if not dual:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    dq = torch.zeros_like(qp) if dq is None else dq
    dk = torch.zeros_like(kp) if dk is None else dk
    dv = torch.zeros_like(vp) if dv is None else dv
    # detached tangents: the op has no gradient for them, and (when the JVP runs on grad-tracking weights, the
    # fused sCT step) a link to their autograd graph would keep everything it saved alive until backward
    o, do, _ = attention_jvp_op(qp, kp, vp, dq.detach(), dk.detach(), dv.detach(), scale)
    return fwAD.make_dual(o, do)
