"""DiT backbone: position embedding and token-wise adaptive norm against float64 references, zero init,
conditioning, the fused attention JVP (eager against finite differences, compiled against eager), specs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scm_graph.model import build_model
from scm_graph.nets.dit import DiT, DiTBlock, TokenAdaptiveNorm, check_config, sincos_2d
from scm_graph.nets.layers import pnorm
from scm_graph.spec import DataSpec, NetSpec, Spec, read_spec_file, validate
from tests.conftest import SPECS
from tests.test_nets import compiled_jvp_vs_eager, jvp_vs_central_difference, perturb_zero_init

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


def test_token_pnorm_and_adaptive_norm_match_float64_reference():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 7, dtype=F64) * 3
    ref = v / torch.sqrt((v**2).sum(-1, keepdim=True) / 7 + 1e-4)  # pnorm over channels (last dim)
    assert torch.allclose(pnorm(v, dim=-1), ref, atol=1e-14)
    layer = TokenAdaptiveNorm(6, 4).double()
    x = torch.randn(3, 5, 6, dtype=F64) * 2 + 1
    emb = torch.randn(3, 4, dtype=F64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    xn = (x - mu) / torch.sqrt(var + 1e-6)  # layer norm without affine
    s = emb @ layer.scale.weight.T + layer.scale.bias
    b = emb @ layer.shift.weight.T + layer.shift.bias
    s = s / torch.sqrt(s.square().mean(-1, keepdim=True) + 1e-4)
    b = b / torch.sqrt(b.square().mean(-1, keepdim=True) + 1e-4)
    assert torch.allclose(layer(x, emb), xn * s[:, None] + b[:, None], atol=1e-12)


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
    assert torch.equal(net(x, c, guidance=s1), net(x, c, guidance=s2))  # zero-initialised map_guidance: no effect yet
    perturb_zero_init(net, only="map_guidance")
    a, b = net(x, c, guidance=s1), net(x, c, guidance=s2)
    assert (a - b)[0].abs().max() > 1e-4 and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="guidance") as e:
        net(x, c)
    assert "\n" not in str(e.value)
    assert DiT(8, 1, **TINY).map_guidance is None  # off by default


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


# ----------------------------------------------------------------------------- specs and build_model


def _resolved(spec: Spec, resolution: int = 8, channels: int = 1) -> Spec:
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=resolution, channels=channels))


def test_build_model_dit_from_spec():
    net = NetSpec(arch="dit", channels=16, depth=3, patch_size=4, head_dim=8, mlp_ratio=2.0, class_conditional=True)
    spec = Spec(data=DataSpec(resolution=8, channels=3, num_classes=10), net=net)
    validate(spec)
    m = build_model(spec)
    assert isinstance(m.net, DiT) and len(m.net.blocks) == 3 and m.net.blocks[0].heads == 2
    assert m.net.patch_size == 4 and m.net.map_label is not None and m.net.map_guidance is None
    x = torch.randn(2, 3, 8, 8)
    assert m(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape


@pytest.mark.parametrize("name,arch,num_attn", [("digits_dit", "dit", 4), ("digits_sct_attn", "unet", 11)])
def test_new_spec_files_load_and_build(name, arch, num_attn):
    from scm_graph.nets.attention import SelfAttention2d

    spec = _resolved(read_spec_file(SPECS / f"{name}.py"))
    validate(spec)
    assert spec.net.arch == arch and spec.net.head_dim == 32
    m = build_model(spec)
    blocks = m.net.blocks if arch == "dit" else [b for b in m.net.modules() if isinstance(b, SelfAttention2d)]
    assert len(blocks) == num_attn
    sct = read_spec_file(SPECS / "digits_sct.py")
    assert (spec.objective, spec.optim, spec.train) == (sct.objective, sct.optim, sct.train)
    x = torch.randn(2, 1, 8, 8)
    assert m(x, torch.rand(2)).shape == x.shape


def test_cifar10_specs_have_ddpmpp_attention():
    for name in ("cifar10_diffusion", "cifar10_sct"):
        spec = read_spec_file(SPECS / f"{name}.py")
        assert spec.net.attn_resolutions == (16,) and spec.net.arch == "unet"
        validate(_resolved(spec, 32, 3))
