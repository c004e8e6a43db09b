"""The optimiser update decided on the device (`scm_graph.train.update.GuardedUpdate`): applied, it is exactly
`optimizer.step()`; skipped, weights and optimiser state are exactly as before, even when the gradients are
not finite and whether or not the optimiser's state exists yet."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scm_graph.spec import OptimSpec
from scm_graph.train.update import (
    GuardedUpdate,
    make_optimizer,
    portable_state,
    takes_found_inf,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.SiLU(), nn.Linear(7, 3))


def _grads(m: nn.Module, seed: int, poison: float | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if poison is not None:
        next(m.parameters()).grad[0, 0] = poison


def _optim(m: nn.Module, kind: str, device_skip: bool) -> torch.optim.Optimizer:
    return make_optimizer(list(m.parameters()), OptimSpec(kind=kind, lr=1e-2), device_skip)


def _same(a: nn.Module, oa: torch.optim.Optimizer, b: nn.Module, ob: torch.optim.Optimizer, atol: float = 0.0) -> None:
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sb.keys() <= sa.keys()
    for i in sa:
        for k, v in sa[i].items():
            if i in sb:
                torch.testing.assert_close(v.float(), sb[i][k].float(), rtol=0, atol=atol)
            else:  # a skipped first update leaves the state it created at zero
                assert not v.any()


@pytest.mark.parametrize(("kind", "lag"), [("radam", False), ("radam", True), ("adam", None)])
@pytest.mark.parametrize("pattern", [(True, True, True, True), (False, True, False, True), (True, False, False, True)])
def test_the_guarded_update_is_the_host_decision(kind: str, lag: bool | None, pattern: tuple[bool, ...]):
    """A run of steps, some skipped (with a NaN or inf gradient there), against a twin whose optimiser steps only
    where the flag is set: the same weights and state at every step (fused Adam rounds as foreach does to 1e-7).
    `lag`: RAdam's step counts kept on the host and taken back at the next update, as on an accelerator."""
    guarded, ref = _net(), _net()
    og = _optim(guarded, kind, device_skip=True)
    oref = _optim(ref, kind, device_skip=False)
    assert takes_found_inf(og) == (kind == "adam") and not takes_found_inf(oref)
    update = GuardedUpdate(og, lag_counters=lag)
    for i, apply in enumerate(pattern):
        _grads(guarded, i, None if apply else (float("nan") if i % 2 else float("inf")))
        _grads(ref, i)
        update(torch.tensor(apply))
        if apply:
            oref.step()
        update.settle()
        _same(guarded, og, ref, oref, atol=0.0 if kind == "radam" else 1e-7)
        assert all(torch.isfinite(p).all() for p in guarded.parameters())


def test_lagged_counters_are_taken_back_at_the_next_update():
    """With host-side step counts, a skipped update's count stands until the next update (or settle) takes it back,
    and that next update runs with the right count (the same weights as a twin that never took the skipped step)."""
    guarded, ref = _net(), _net()
    og, oref = _optim(guarded, "radam", True), _optim(ref, "radam", False)
    update = GuardedUpdate(og, lag_counters=True)
    for i in range(2):
        _grads(guarded, i)
        _grads(ref, i)
        update(torch.tensor(True))
        oref.step()
    _grads(guarded, 2, float("nan"))
    update(torch.tensor(False))
    assert all(og.state[p]["step"].item() == 3 for p in guarded.parameters())  # not yet taken back
    _grads(guarded, 3)
    _grads(ref, 3)
    update(torch.tensor(True))  # settles the skip first: count 2 -> 3, as the twin's
    oref.step()
    _same(guarded, og, ref, oref)


def test_skipping_the_first_step_leaves_a_fresh_optimiser():
    """Before any update there is no state; a skipped first step leaves it all zero, and the next step is a first one."""
    m, ref = _net(), _net()
    o, oref = _optim(m, "radam", True), _optim(ref, "radam", False)
    update = GuardedUpdate(o, lag_counters=True)
    w0 = copy.deepcopy(m.state_dict())
    _grads(m, 0, float("nan"))
    update(torch.tensor(False))
    update.settle()
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())
    assert all(not v.any() for st in o.state.values() for v in st.values())
    _grads(m, 1)
    _grads(ref, 1)
    update(torch.tensor(True))
    oref.step()
    _same(m, o, ref, oref)


def test_a_state_saved_with_device_flags_resumes_without_them():
    """A checkpoint's optimiser state written with fused Adam (or with PyTorch's `capturable` set) loads into the
    CPU's optimiser (and the other way round), keeping the loader's own execution flags."""
    for kind in ("adam", "radam"):
        a, b = _net(), _net()
        oa, ob = _optim(a, kind, True), _optim(b, kind, False)
        _grads(a, 0)
        oa.step()
        sd = copy.deepcopy(oa.state_dict())  # as read from a file: nothing shared with oa
        sd["param_groups"][0]["capturable"] = True  # as written on a GPU (RAdam); PyTorch refuses it on the CPU
        ob.load_state_dict(portable_state(ob, sd))
        assert not ob.param_groups[0]["capturable"] and not ob.param_groups[0].get("fused")
        b.load_state_dict(a.state_dict())
        _grads(a, 1)
        _grads(b, 1)
        oa.step()
        ob.step()
        _same(a, oa, b, ob, atol=1e-7)
