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
    assert len({int(b.dropout.salt) for b in net.blocks}) == 3  # a different dropout mask per block
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


# ----------------------------------------------------------------------------- patch placement


class _NoNorm(torch.nn.Module):
    """Stands in for norm_out: passes the tokens through (the adaptive norm casts to float32 and mixes channels)."""

    def forward(self, tokens, emb):
        return tokens


PLACEMENT = [(6, 3, 2), (12, 2, 3), (8, 1, 4)]  # (resolution, channels, patch): grids 3, 4 and 2
WIDE = dict(width=24, head_dim=8, mlp_ratio=2.0)  # width >= p * p * C for every case


def _placement_net(res: int, ch: int, patch: int, depth: int = 0) -> DiT:
    """A float64 DiT whose blocks are inert (none, or zero-initialised residual branches) and norm_out is identity."""
    torch.manual_seed(0)
    net = DiT(res, ch, depth=depth, patch_size=patch, **WIDE).double()
    net.norm_out = _NoNorm()
    return net


def _select(rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] float64 with ones on the diagonal: row m picks column m."""
    return torch.eye(rows, cols, dtype=F64)


def _reference(x, wp, bp, pos, wo, bo, p: int) -> torch.Tensor:
    """Patchify, position embedding, final linear and unpatchify in plain Python loops (float64).

    Token n = i * grid + j holds patch (i, j): pixels (i p + a, j p + b); output feature m = (a p + b) C + c
    of token n lands at pixel (c, i p + a, j p + b).
    """
    bsz, ch, res, _ = x.shape
    grid, width = res // p, wp.shape[0]
    x, wp, bp, pos, wo, bo = (t.tolist() for t in (x, wp, bp, pos, wo, bo))
    y = [[[[0.0] * res for _ in range(res)] for _ in range(ch)] for _ in range(bsz)]
    for s in range(bsz):
        for i in range(grid):
            for j in range(grid):
                n = i * grid + j
                token = [bp[k] + pos[n][k] + sum(wp[k][c][a][b] * x[s][c][i * p + a][j * p + b]
                                                 for c in range(ch) for a in range(p) for b in range(p))
                         for k in range(width)]
                for a in range(p):
                    for b in range(p):
                        for c in range(ch):
                            m = (a * p + b) * ch + c
                            y[s][c][i * p + a][j * p + b] = bo[m] + sum(wo[m][k] * token[k] for k in range(width))
    return torch.tensor(y, dtype=F64)


@pytest.mark.parametrize("res,ch,patch", PLACEMENT)
def test_dit_patch_placement_matches_hand_written_loops(res, ch, patch):
    """Random patchify / output weights, the real 2D position embedding: the DiT is the loop reference."""
    net = _placement_net(res, ch, patch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in (net.patchify.weight, net.patchify.bias, net.out.weight, net.out.bias):
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=F64))
    x, c = torch.randn(2, ch, res, res, generator=g, dtype=F64), torch.rand(2, dtype=F64)
    ref = _reference(x, net.patchify.weight, net.patchify.bias, net.pos[0].double(), net.out.weight, net.out.bias, patch)
    torch.testing.assert_close(net(x, c), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("res,ch,patch", PLACEMENT)
def test_dit_output_patch_ij_comes_from_token_i_grid_plus_j(res, ch, patch, depth):
    """Tokens set by hand (value 100 n + k in feature k of token n), the final linear picks features
    0..p p C - 1: pixel (c, i p + a, j p + b) must hold 100 (i grid + j) + (a p + b) C + c."""
    net = _placement_net(res, ch, patch, depth)  # depth 2: zero-initialised blocks add exactly 0
    grid, width, out_feats = res // patch, net.pos.shape[-1], patch * patch * ch
    n, k = torch.meshgrid(torch.arange(grid * grid, dtype=F64), torch.arange(width, dtype=F64), indexing="ij")
    with torch.no_grad():
        net.patchify.weight.zero_()
        net.patchify.bias.zero_()
        net.pos = (100 * n + k)[None]
        net.out.weight.copy_(_select(out_feats, width))
        net.out.bias.zero_()
    y = net(torch.randn(2, ch, res, res, dtype=F64), torch.rand(2, dtype=F64))
    for i in range(grid):
        for j in range(grid):
            for a in range(patch):
                for b in range(patch):
                    for c in range(ch):
                        want = 100 * (i * grid + j) + (a * patch + b) * ch + c
                        got = y[:, c, i * patch + a, j * patch + b].tolist()
                        assert got == [want, want], f"patch ({i}, {j}) offset ({a}, {b}) channel {c}: {got}, want {want}"


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("res,ch,patch", PLACEMENT)
def test_dit_token_i_grid_plus_j_holds_patch_ij(res, ch, patch, depth):
    """Patchify set by hand to copy pixel (c, a, b) of a patch into feature (a p + b) C + c, no position
    embedding: token i grid + j holds the pixels (i p + a, j p + b), and the output is the input again."""
    net = _placement_net(res, ch, patch, depth)
    grid, width, out_feats = res // patch, net.pos.shape[-1], patch * patch * ch
    with torch.no_grad():
        # conv weight [width, C, p, p]: feature (a p + b) C + c reads channel c at offset (a, b)
        net.patchify.weight.copy_(_select(width, out_feats).view(width, patch, patch, ch).permute(0, 3, 1, 2))
        net.patchify.bias.zero_()
        net.pos = torch.zeros_like(net.pos, dtype=F64)
        net.out.weight.copy_(_select(out_feats, width))
        net.out.bias.zero_()
    seen = []
    net.norm_out.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = torch.randn(2, ch, res, res, dtype=F64)
    y = net(x, torch.rand(2, dtype=F64))
    (tokens,) = seen
    assert tokens.shape == (2, grid * grid, width)
    for i in range(grid):
        for j in range(grid):
            for a in range(patch):
                for b in range(patch):
                    for c in range(ch):
                        assert torch.equal(tokens[:, i * grid + j, (a * patch + b) * ch + c],
                                           x[:, c, i * patch + a, j * patch + b]), \
                            f"token {i * grid + j} feature {(a * patch + b) * ch + c} is not pixel ({c}, {i * patch + a}, {j * patch + b})"
    assert torch.equal(tokens[..., out_feats:], torch.zeros_like(tokens[..., out_feats:]))
    assert torch.equal(y, x)
