"""The zero-tangent pass: it drops exactly the products that forward-mode AD feeds an all-zero operand, and the
numbers stay the same (on a traced aten graph, and in the compiled sCT loss of a shipped network)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.fx.experimental.proxy_tensor import make_fx

from scm_graph.ops import zero_tangents
from scm_graph.ops.zero_tangents import (
    COMPILE_OPTIONS,
    ZeroTangentPass,
    drop_zero_products,
    zero_nodes,
)

aten = torch.ops.aten


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x))
        return self.lin(h.mean((2, 3)))


def _count(graph, target) -> int:
    return sum(1 for n in graph.nodes if n.target == target)


def _traced_jvp():
    net = Tiny().requires_grad_(False)
    params = dict(net.named_parameters())

    def f(x, v):
        return jvp(lambda y: functional_call(net, params, (y,)), (x,), (v,))

    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    return make_fx(f)(x, v), f, x, v


def test_forward_ad_leaves_a_zero_weight_product_per_layer_and_the_pass_drops_it():
    gm, f, x, v = _traced_jvp()
    convs, mms = _count(gm.graph, aten.convolution.default), _count(gm.graph, aten.mm.default) + _count(gm.graph, aten.addmm.default)
    assert convs == 3  # conv(x, W), conv(dx, W) and conv(x, 0): the waste this pass exists for
    dropped = drop_zero_products(gm.graph)
    gm.recompile()
    assert dropped >= 2  # the zero-weight convolution and the zero-weight matmul
    assert _count(gm.graph, aten.convolution.default) == 2
    assert _count(gm.graph, aten.mm.default) + _count(gm.graph, aten.addmm.default) == mms - (dropped - 1)
    want = f(x, v)
    got = gm(x, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # a product with a zero operand is exactly zero


def test_only_products_with_a_zero_operand_count_as_zero():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    zero = g.call_function(aten.full.default, ([], 0), {"dtype": torch.float32})
    one = g.call_function(aten.full.default, ([], 1.0), {"dtype": torch.float32})
    zw = g.call_function(aten.expand.default, (zero, [4, 3, 3, 3]))
    ow = g.call_function(aten.expand.default, (one, [4, 3, 3, 3]))
    bias = g.call_function(aten.full.default, ([4], 0.5), {"dtype": torch.float32})
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    c_zero = g.call_function(aten.convolution.default, (x, zw, None, *args))
    c_one = g.call_function(aten.convolution.default, (x, ow, None, *args))
    c_bias = g.call_function(aten.convolution.default, (x, zw, bias, *args))  # = the bias, not zero
    c_w = g.call_function(aten.convolution.default, (x, w, None, *args))
    prod = g.call_function(aten.mul.Tensor, (c_w, c_zero))
    s = g.call_function(aten.add.Tensor, (c_w, c_zero))  # one zero term: not zero
    by_inf = g.call_function(aten.mul.Tensor, (zero, float("inf")))  # 0 * inf is NaN
    by_two = g.call_function(aten.mul.Tensor, (zero, 2.0))
    zeros = zero_nodes(g)
    assert {zero, zw, c_zero, prod, by_two} <= zeros
    assert not ({one, ow, c_one, c_bias, c_w, s, by_inf} & zeros)


def test_the_pass_keys_the_cache_by_its_source():
    p = ZeroTangentPass()
    assert p.uuid() == ZeroTangentPass().uuid() and p.uuid()
    assert COMPILE_OPTIONS["post_grad_custom_pre_pass"].uuid() == p.uuid()


@pytest.mark.slow
@pytest.mark.parametrize(("spec_path", "fused"), [("specs/digits_sct.py", False), ("specs/digits_dit.py", False),
                                                  ("specs/digits_dit.py", True)])
def test_the_compiled_sct_loss_runs_two_products_per_layer_and_matches_eager(spec_path, fused, monkeypatch):
    """In the compiled sCT loss of a shipped network the pass drops products, every JVP-pass convolution / matmul
    left has a non-zero operand, and loss and gradients match the eager objective; `fused`: the accelerators' step
    (F_theta from the JVP's primal, `objective.fused_pass` 'on'), forced on the CPU."""
    from scm_graph.bench.step_timing import bench_spec
    from scm_graph.model import build_model
    from scm_graph.objectives import StepInputs, get_objective

    seen: list[tuple[int, int]] = []
    real = zero_tangents.drop_zero_products

    def counting(graph):
        before = len(zero_nodes(graph) & {n for n in graph.nodes if n.target in zero_tangents._EXPENSIVE})
        dropped = real(graph)
        seen.append((before, dropped))
        assert not (zero_nodes(graph) & {n for n in graph.nodes if n.target in zero_tangents._EXPENSIVE})
        return dropped

    monkeypatch.setattr(zero_tangents, "drop_zero_products", counting)
    spec = bench_spec(spec_path)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch=4),
                               objective=dataclasses.replace(spec.objective, fused_pass="on" if fused else "off"))
    torch.manual_seed(0)
    model = build_model(spec).train()
    params = dict(model.named_parameters())
    d = spec.data
    g = torch.Generator().manual_seed(0)
    shape = (4, d.channels, d.resolution, d.resolution)
    labels = torch.arange(4) % d.num_classes if spec.net.class_conditional else None
    inp = StepInputs(torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g) * 0.5,
                     torch.tensor([0.2, 0.6, 1.0, 1.4]), labels, torch.tensor(3), torch.tensor(0.5))
    loss_fn = get_objective("sct")

    def run(fn):
        loss = fn(params, inp)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return loss.detach(), grads

    f = lambda p, i: loss_fn(model, p, i, spec.objective).loss
    want_loss, want_grads = run(f)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got_loss, got_grads = run(torch.compile(f, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS))  # no cache hit
    assert sum(dropped for _, dropped in seen) > 0
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
