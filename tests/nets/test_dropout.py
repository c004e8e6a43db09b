"""Keyed dropout: uniform statistics, determinism in (key, salt), keep rate and unbiased scale."""

from __future__ import annotations

import pytest
import torch

from scm_graph.nets.dropout import KeyedDropout, keyed_uniform


def test_keyed_uniform_statistics_and_determinism():
    shape = torch.Size([64, 32, 16])
    u = keyed_uniform(shape, torch.tensor(7), 3, torch.device("cpu"))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    # neighbouring elements uncorrelated
    a, b = u.flatten()[:-1] - 0.5, u.flatten()[1:] - 0.5
    assert abs((a * b).mean().item()) < 2e-3
    assert torch.equal(u, keyed_uniform(shape, torch.tensor(7), 3, torch.device("cpu")))
    for other in (keyed_uniform(shape, torch.tensor(8), 3, torch.device("cpu")),
                  keyed_uniform(shape, torch.tensor(7), 4, torch.device("cpu"))):
        assert (u == other).float().mean() < 1e-3


def test_keyed_dropout_keep_rate_and_unbiased_scale():
    d = KeyedDropout(0.2, salt=1).train()
    x = torch.ones(200, 1000)
    y = d(x, torch.tensor(5))
    assert abs((y > 0).float().mean().item() - 0.8) < 3e-3
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.8))
    assert abs(y.mean().item() - 1.0) < 5e-3  # E[dropout(x)] = x
    assert torch.equal(d.eval()(x, torch.tensor(5)), x)


def test_keyed_uniform_uses_all_64_key_bits():
    """The high half (the run seed) changes the mask; keys below 2^32 give the numbers they always gave."""
    shape, cpu = torch.Size([4096]), torch.device("cpu")
    base = keyed_uniform(shape, torch.tensor(3), 1, cpu)
    for hi in (1, 2, 2**31 - 1):
        other = keyed_uniform(shape, torch.tensor((hi << 32) + 3), 1, cpu)
        assert (base == other).float().mean() < 1e-2
    # the value for a small key, written by the formula before the high half counted (murmur3 fmix32 chain)
    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    seed = fmix((3 * 0x9E3779B1 + 1) & 0xFFFFFFFF)
    for i in (0, 1, 4095):
        h = fmix((i ^ seed) & 0xFFFFFFFF)
        h = fmix((h + seed * 0x27D4EB2F) & 0xFFFFFFFF)
        assert base[i].item() == (torch.tensor(float(h), dtype=torch.float32) * (1.0 / 4294967296.0)).item()  # float32, as the op


def test_keyed_dropout_salt_is_an_unsaved_buffer_with_the_int_salts_masks():
    """The salt is a buffer (a compiled graph's input, not a constant): the masks are those of the int salt, it
    moves with the module, and it is not in the state dict (the network's structure sets it)."""
    d = KeyedDropout(0.3, salt=5).train()
    assert dict(d.named_buffers())["salt"].dtype == torch.int64 and "salt" not in d.state_dict()
    x, key = torch.ones(8, 4, 6, 6), torch.tensor([(7 << 32) + 11, 16])
    keep = keyed_uniform(x.shape, key, 5, torch.device("cpu")) >= 0.3
    assert torch.equal(d(x, key), x * keep.float() / 0.7)
    assert not torch.equal(d(x, key), KeyedDropout(0.3, salt=6).train()(x, key))
    assert torch.equal(d.double()(x.double(), key), (x.double() * keep.double() / 0.7))  # dtype casts leave it alone
    assert d.salt.dtype == torch.int64


@pytest.mark.slow
def test_keyed_dropout_compiled_equals_eager_with_two_layers_of_one_shape():
    """Two equally shaped layers (whose mask kernels a compiled graph may share) keep their own masks."""
    a, b = KeyedDropout(0.5, salt=1).train(), KeyedDropout(0.5, salt=2).train()

    def f(x: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = a(x, key)
        return h, b(torch.nn.functional.conv2d(h, torch.ones(4, 4, 1, 1)), key)

    x, key = torch.randn(2, 4, 5, 5), torch.tensor(9)
    eager = f(x, key)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(x, key)
    assert all(torch.equal(e, c) for e, c in zip(eager, compiled))
    assert not torch.equal(eager[0] != 0, eager[1] != 0)
