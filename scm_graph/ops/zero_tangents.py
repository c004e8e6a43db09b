"""A compiler pass that drops the products with zero tangents that `torch.func.jvp` leaves in a compiled graph.

Under `torch.func.jvp` the weights have no tangent, but PyTorch's forward-mode formulas for convolution and
matrix products still take the tangent of *every* operand, so a traced JVP of a layer y = conv(x, W) + b reads
    dy = conv(dx, W) + conv(x, 0) [+ 0]
with the zero weight tangent materialised as `full([], 0).expand(W.shape)`. Inductor does not fold a
convolution or matmul by an expanded zero, so each layer's JVP runs three products instead of two: on the
digits U-Net a third of the JVP's convolution time (docs/design.md, "Traps"; docs/bench_step_cpu.md).

`ZeroTangentPass` (an Inductor post-grad pass) finds the values that are zero by construction (a `full` of 0,
and what shape ops, products and sums make of it) and replaces each convolution and matrix product among them
by a `full` of zeros of the same shape and dtype, which Inductor fuses into its consumers for free. Nothing
else changes: a product with an all-zero operand is exactly zero, so the compiled numbers are the same (if the
other operand holds an inf or NaN, the true product is NaN, not 0; such an activation makes the primal output
non-finite too, and the objectives mask that sample either way). The pass keys Inductor's cache by this file's hash. `COMPILE_OPTIONS` is what `torch.compile(options=...)` takes.
"""

from __future__ import annotations

import math

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

aten = torch.ops.aten

# a zero in, a zero out (shape and layout ops, casts)
_SHAPE_OPS = {aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
              aten.clone.default, aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
              aten.squeeze.default, aten.alias.default, aten.contiguous.default, aten.slice.Tensor, aten.select.int,
              torch.ops.prims.convert_element_type.default, aten._to_copy.default}
# zero when either operand is zero
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.mul.Tensor}
# the products worth replacing (the pointwise ones Inductor fuses anyway)
_EXPENSIVE = {aten.convolution.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}


def _is_zero_fill(n: Node) -> bool:
    if n.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    if n.target in (aten.full.default, aten.full_like.default):
        return len(n.args) > 1 and not isinstance(n.args[1], Node) and n.args[1] == 0
    return False


def _finite(args) -> bool:
    """False when a product's operand is a non-finite Python number (0 * inf is NaN, not 0)."""
    return all(isinstance(a, Node) or math.isfinite(a) for a in args)


def zero_nodes(graph: Graph) -> set[Node]:
    """The nodes whose value is all zeros by construction, in one pass over the (topologically ordered) graph."""
    zero: set[Node] = set()

    def z(a) -> bool:
        return isinstance(a, Node) and a in zero

    for n in graph.nodes:
        if n.op != "call_function":
            continue
        t, a = n.target, n.args
        if (_is_zero_fill(n) or (t in _SHAPE_OPS and z(a[0])) or (t in _PRODUCTS and (z(a[0]) or z(a[1])) and _finite(a[:2]))
                or (t == aten.convolution.default and (z(a[0]) or z(a[1])) and (a[2] is None or z(a[2])))
                or (t in (aten.addmm.default, aten.baddbmm.default) and z(a[0]) and (z(a[1]) or z(a[2])))
                or (t in (aten.add.Tensor, aten.sub.Tensor) and z(a[0]) and z(a[1]))):
            zero.add(n)
    return zero


def drop_zero_products(graph: Graph) -> int:
    """Replace every convolution / matrix product that is zero by construction with a `full` of zeros; the count."""
    zero, count = zero_nodes(graph), 0
    for n in list(graph.nodes):  # a replaced node's own zero-ness is unchanged, so one analysis serves the whole pass
        val = n.meta.get("val")
        if n.target not in _EXPENSIVE or n not in zero or not isinstance(val, torch.Tensor):
            continue
        with graph.inserting_before(n):
            full = graph.call_function(aten.full.default, (list(val.shape), 0),
                                       {"dtype": val.dtype, "layout": torch.strided, "device": val.device, "pin_memory": False})
        full.meta.update(n.meta)
        n.replace_all_uses_with(full)
        graph.erase_node(n)
        count += 1
    if count:
        graph.eliminate_dead_code()  # the zero operands that fed only these products
    return count


class ZeroTangentPass(CustomGraphPass):
    """Inductor post-grad pass: `drop_zero_products`; its uuid is this file's hash (so the FX graph cache stays on)."""

    def __call__(self, graph: Graph) -> None:
        drop_zero_products(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


COMPILE_OPTIONS = {"post_grad_custom_pre_pass": ZeroTangentPass()}
