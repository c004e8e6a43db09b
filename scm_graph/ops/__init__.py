"""Fused attention ops: `attention` (used by every network) and `jvp_attention` (O and dO in one pass)."""

from scm_graph.ops.routing import BACKENDS, attention, calls, jvp_attention, use_backend

__all__ = ["BACKENDS", "attention", "calls", "jvp_attention", "use_backend"]
