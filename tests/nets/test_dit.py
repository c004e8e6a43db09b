"""DiT backbone: position embedding and token-wise adaptive norm against float64 references, zero init,
conditioning, the fused attention JVP (eager against finite differences, compiled against eager), specs."""

from __future__ import annotations

import math

import pytest
import torch

from scm_graph.nets.dit import DiT, DiTBlock, check_config, sincos_2d
from tests.helpers import compiled_jvp_vs_eager, jvp_vs_central_difference, perturb_zero_init

F64 = torch.float64
TINY = dict(width=16, depth=2, patch_size=2, head_dim=8, mlp_ratio=2.0)


def test_sincos_2d_matches_hand_written_reference():
    grid, width = 3, 8
    ref = torch.empty(grid * grid, width, dtype=F64)
    for i in range(grid):
        for j in range(grid):
            for k in range(width // 4):
                w = 10000.0 ** (-k / (width // 4))  # w_k = 10000^(-k / (width/4))
                n = i * grid + j  # row-major token order, as patchify flattens (h w)
                ref[n, k], ref[n, 2 + k] = math.sin(i * w), math.cos(i * w)
                ref[n, 4 + k], ref[n, 6 + k] = math.sin(j * w), math.cos(j * w)
    out = sincos_2d(grid, width)
    assert out.dtype == torch.float32 and out.shape == (9, 8)
    assert torch.allclose(out.double(), ref, atol=1e-7)
    net = DiT(8, 1, **TINY)
    assert torch.equal(net.pos[0], sincos_2d(4, 16)) and "pos" not in net.state_dict()  # fixed, not saved


@pytest.mark.parametrize("res,ch,patch", [(8, 1, 2), (8, 3, 4), (12, 2, 3)])
def test_dit_shape_zero_init_and_perturbed_output(res, ch, patch):
    torch.manual_seed(0)
    net = DiT(res, ch, **{**TINY, "patch_size": patch}).double()
    x, c = torch.randn(2, ch, res, res, dtype=F64), torch.rand(2, dtype=F64)
    out = net(x, c)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # zero-initialised final linear
    perturb_zero_init(net, only="out.")
    a = net(x, c)
    assert a.abs().max() > 1e-3
    perturb_zero_init(net, only="blocks.")  # attention / MLP output projections
    assert (net(x, c) - a).abs().max() > 1e-4
    # attention mixes tokens: a change inside patch (0, 0) reaches the last patch's output
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    assert (net(x2, c) - net(x, c))[:, :, -1, -1].abs().max() > 0


def test_dit_class_conditioning_changes_output():
    torch.manual_seed(0)
    net = DiT(8, 1, num_classes=10, **TINY).double()
    perturb_zero_init(net)
    x, c = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64)
    a, b = net(x, c, torch.tensor([1, 2])), net(x, c, torch.tensor([3, 2]))
    assert (a - b)[0].abs().max() > 1e-4 and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)


def test_dit_guidance_conditioning():
    torch.manual_seed(0)
    net = DiT(8, 1, guidance_conditional=True, **TINY).double()
    perturb_zero_init(net, only="out.")
    perturb_zero_init(net, only="blocks.")
    x, c = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64)
    s1, s2 = torch.tensor([1.0, 1.5], dtype=F64), torch.tensor([2.0, 1.5], dtype=F64)
    assert torch.equal(net(x, c, guidance=s1), net(x, c, guidance=s2))  # zero-initialised guidance input: no effect yet
    perturb_zero_init(net, only="emb.guidance")
    a, b = net(x, c, guidance=s1), net(x, c, guidance=s2)
    assert (a - b)[0].abs().max() > 1e-4 and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="guidance") as e:
        net(x, c)
    assert "\n" not in str(e.value)
    assert DiT(8, 1, **TINY).emb.guidance is None  # off by default


@pytest.mark.parametrize("kw,needle", [
    (dict(width=24, head_dim=16), "head_dim"),
    (dict(width=18, head_dim=6), "multiple of 4"),
    (dict(patch_size=3), "patch_size"),
])
def test_dit_config_errors_are_one_line(kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        DiT(8, 1, **{**TINY, **kw})
    assert "\n" not in str(e.value)
    check_config(0, 16, 3, 8)  # resolution not known yet: the patch check waits


def test_dit_block_structure():
    net = DiT(8, 1, **{**TINY, "depth": 3})
    assert len(net.blocks) == 3 and all(isinstance(b, DiTBlock) and b.heads == 2 for b in net.blocks)
    assert net.blocks[0].fc0.out_features == 32  # mlp_ratio 2 x width 16
    assert len({b.dropout.salt for b in net.blocks}) == 3  # a different dropout mask per block
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) for m in net.modules())


def test_dit_jvp_is_fused_and_matches_central_difference():
    torch.manual_seed(0)
    net = DiT(8, 1, num_classes=10, dropout=0.3, **TINY).double().train()
    perturb_zero_init(net)
    x, c, labels, key = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64), torch.tensor([0, 7]), torch.tensor(5)
    rel, fused = jvp_vs_central_difference(lambda x, c: net(x, c, labels, key), x, c)  # keyed dropout: F is deterministic
    assert rel < 1e-6
    assert fused == 2  # one fused attention JVP per block


@pytest.mark.slow
def test_dit_compiled_jvp_matches_eager(torch_defaults):
    torch.manual_seed(0)
    net = DiT(8, 1, **TINY)
    perturb_zero_init(net)
    compiled_jvp_vs_eager(net, torch.randn(2, 1, 8, 8), torch.rand(2), num_attn=2)
