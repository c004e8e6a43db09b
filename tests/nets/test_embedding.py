"""The conditioning embedding: the positional time embedding against its formula, float32 under autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp

from scm_graph.model import build_model
from scm_graph.nets.embedding import PositionalEmbedding
from tests.helpers import tiny_spec

F64 = torch.float64


def test_positional_embedding_matches_formula_and_has_unit_max_frequency():
    emb = PositionalEmbedding(16).double()
    c = torch.tensor([0.0, 0.3, 1.2, math.pi / 2], dtype=F64)
    out = emb(c)
    ref = torch.empty(4, 16, dtype=F64)
    for k in range(8):
        w = 10000.0 ** (-k / 8)  # w_k = (1/10000)^(k/half)
        ref[:, k] = torch.cos(w * c)
        ref[:, 8 + k] = torch.sin(w * c)
    assert torch.allclose(out, ref, atol=1e-15)
    # largest frequency is 1: |d emb / dc| <= 1 (the small Fourier scale of sCM Sec. 4.1)
    _, d = jvp(emb, (c,), (torch.ones_like(c),))
    assert d.abs().max() <= 1.0 + 1e-12


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_time_embedding_and_modulation_stay_float32_under_autocast(arch):
    """Under bf16 autocast t, the time embedding and the adaptive-norm modulation are float32 while the
    body (convs / attention projections) runs in bf16 (docs/design.md, "Mixed precision")."""
    spec = tiny_spec("dit", width=8, head_dim=4, depth=1) if arch == "dit" else tiny_spec(attn_resolutions=(4,), head_dim=4)
    m = build_model(spec)
    seen: dict[str, torch.dtype] = {}
    norm = next(mod for mod in m.modules() if hasattr(mod, "scale") and isinstance(mod.scale, torch.nn.Linear))
    body = next(mod for name, mod in m.net.named_modules() if name.endswith("qkv"))
    for name, mod in (("emb", m.net.emb.fc1), ("modulation", norm.scale), ("body", body)):
        mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 1, 8, 8), torch.rand(2) + 0.1, torch.tensor([1, 2]))
    assert seen == {"emb": torch.float32, "modulation": torch.float32, "body": torch.bfloat16}


def test_null_label_is_a_zero_one_hot():
    """Label -1 (classifier-free guidance's null class) adds nothing: the embedding of c_noise alone."""
    from scm_graph.nets.embedding import ConditionEmbedding

    torch.manual_seed(0)
    emb = ConditionEmbedding(16, 32, num_classes=5)
    c = torch.rand(4)
    out = emb(c, torch.tensor([-1, 2, -1, 4]))
    plain = torch.nn.functional.silu(emb.fc1(torch.nn.functional.silu(emb.fc0(emb.noise(c)))))
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
    with_label = torch.nn.functional.silu(emb.fc1(torch.nn.functional.silu(emb.fc0(emb.noise(c) + emb.label.weight.T[[0, 2, 0, 4]]))))
    torch.testing.assert_close(out[[1, 3]], with_label[[1, 3]], rtol=1e-6, atol=1e-6)


def test_class_one_hot_is_torch_one_hot_and_compiles_whole():
    """class_one_hot is F.one_hot with a zero row for the null label, and compiles as one graph under torch.func.jvp
    (there F.one_hot's data-dependent range check broke torch 2.11's compile of every class-conditional step)."""
    from scm_graph.nets.embedding import class_one_hot
    from scm_graph.teacher import one_hot_labels

    labels = torch.tensor([3, -1, 0, 9, 9, -1, 5])
    want = torch.nn.functional.one_hot(labels.clamp(min=0), 10) * (labels >= 0)[:, None]
    got = class_one_hot(labels, 10)
    assert got.dtype == want.dtype and torch.equal(got, want)
    x = torch.randn(7, 10)

    def under_jvp(labels, x):  # the one-hot inside the step's JVP
        return jvp(lambda x: x * class_one_hot(labels, 10), (x,), (torch.ones_like(x),))

    graphs = []

    def capture(gm, example_inputs):  # Dynamo's graph: traced whole, with no one_hot (and its range check) in it
        graphs.append(gm.code)
        return gm.forward

    out, tangent = torch.compile(under_jvp, backend=capture, fullgraph=True)(labels, x)
    assert graphs and not any("one_hot" in g for g in graphs)
    torch.testing.assert_close(out, x * want, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want.float(), rtol=0, atol=0)
    assert torch.equal(one_hot_labels(labels, 10), want.float())
    assert one_hot_labels(None, 10) is None
