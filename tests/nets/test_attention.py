"""The U-Net's self-attention block against a hand-written float64 reference."""

from __future__ import annotations

import math

import torch

from scm_graph.nets.attention import SelfAttention2d
from tests.helpers import perturb_zero_init

F64 = torch.float64


def test_self_attention_block_matches_hand_written_reference():
    torch.manual_seed(0)
    blk = SelfAttention2d(8, head_dim=4, groups=2).double()
    perturb_zero_init(blk)
    x = torch.randn(2, 8, 3, 5, dtype=F64)
    out = blk(x)
    assert blk.heads == 2
    g = x.reshape(2, 2, -1)  # affine-free group norm, 2 groups, eps 1e-5
    xn = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(x)
    qkv = torch.einsum("oc,bcn->bon", blk.qkv.weight[:, :, 0, 0], xn.reshape(2, 8, 15)) + blk.qkv.bias[:, None]
    heads = []
    for m in range(2):  # q, k, v = channels [0, 8), [8, 16), [16, 24); head m takes 4 of each
        q, k, v = (qkv[:, j * 8 + m * 4: j * 8 + m * 4 + 4] for j in range(3))  # [B, d, N]
        p = torch.softmax(torch.einsum("bdi,bdj->bij", q, k) / 2.0, dim=-1)  # softmax(q_i . k_j / sqrt(4))
        heads.append(torch.einsum("bij,bdj->bdi", p, v))
    o = torch.cat(heads, 1)
    proj = torch.einsum("oc,bcn->bon", blk.proj.weight[:, :, 0, 0], o) + blk.proj.bias[:, None]
    ref = (x + proj.reshape_as(x)) / math.sqrt(2)
    assert torch.allclose(out, ref, atol=1e-12)
