"""The EDM2 U-Net: its magnitude-preserving primitives against closed forms, forced weight normalisation (also on
an FSDP2-style DTensor shard), the layout, zero init, float32 against float64, the JVP (eager against finite
differences, compiled against eager), conditioning, dropout placement, config errors, and two real train steps."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from scm_graph.model import build_model, check_net
from scm_graph.nets.edm2 import EDM2UNet, MPConv, check_config, mp_cat, mp_silu, mp_sum, normalize
from scm_graph.objectives import StepInputs
from scm_graph.spec import DataSpec, EDM2Spec, NetSpec, ObjectiveSpec, Spec
from scm_graph.train.step import TrainStep
from tests.helpers import compiled_jvp_vs_eager, jvp_vs_central_difference, one_line_error, perturb_zero_init

F64 = torch.float64
TINY = dict(channels=8, channel_mult=(1, 2), num_blocks=1, head_dim=4, attn_resolutions=(4,))


def _normal(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _tiny_net(**kw) -> EDM2UNet:
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, **{**TINY, "attn_resolutions": (8, 4), **kw}).double()
    perturb_zero_init(net)  # out_gain (and a guidance input) non-zero, so F is not identically 0
    return net


# ---------------------------------------------------------------------------------------------
# Magnitude-preserving primitives


def test_mp_silu_sum_cat_keep_unit_variance():
    a, b = _normal(1 << 20, 0), _normal(1 << 20, 1)
    assert mp_silu(a).square().mean().item() == pytest.approx(1.0, abs=5e-3)  # E[silu(x)^2] = 0.596^2 (EDM2 Eq. 81)
    for t in (0.0, 0.3, 0.5, 1.0):
        assert mp_sum(a, b, t).var().item() == pytest.approx(1.0, abs=5e-3)  # independent unit inputs (Eq. 88)
    x, y = a[: 256 * 4 * 256].reshape(256, 4, 16, 16), b[: 256 * 12 * 256].reshape(256, 12, 16, 16)  # N_a = 4, N_b = 12
    for t in (0.3, 0.5):
        out = mp_cat(x, y, t)
        assert out.square().mean().item() == pytest.approx(1.0, abs=5e-3)  # (Eq. 103)
        share_b = out[:, 4:].square().sum() / out.square().sum()
        assert share_b.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=5e-3)  # the balance sets the energy split


def test_mp_weights_have_unit_norm_per_output_channel_and_keep_unit_variance():
    torch.manual_seed(0)
    for kernel in (0, 1, 3):
        layer = MPConv(6, 5, kernel).double()
        with torch.no_grad():
            layer.weight.mul_(torch.rand(5, *[1] * (layer.weight.ndim - 1), dtype=F64) * 10)  # rows of any norm
        rows = (normalize(layer.weight) / math.sqrt(layer.fan_in)).flatten(1)  # the effective weight at gain 1
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(5, dtype=F64))
    lin = MPConv(64, 32).double()
    out = lin(_normal(64 * 20000).reshape(20000, 64))
    assert out.var(dim=0).mean().item() == pytest.approx(1.0, abs=2e-2)  # unit-variance in, unit-variance out (Eq. 47)


def test_renormalize_projects_weights_is_idempotent_and_keeps_the_function():
    net = _tiny_net(num_classes=10)
    with torch.no_grad():  # move the weights off their spheres, as an optimiser step does
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(0.5 + torch.rand(m.weight.shape[0], *[1] * (m.weight.ndim - 1), dtype=F64))
    x, c, y = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64), torch.tensor([3, -1])
    before = net(x, c, y)
    net.renormalize_()
    weights = {k: v.clone() for k, v in net.named_parameters()}
    for m in net.modules():
        if isinstance(m, MPConv):
            torch.testing.assert_close(m.weight.flatten(1).square().mean(1), torch.ones(m.weight.shape[0], dtype=F64))
    torch.testing.assert_close(net(x, c, y), before, rtol=1e-12, atol=1e-12)  # scale-invariant forward
    net.renormalize_()
    for k, v in net.named_parameters():
        torch.testing.assert_close(v, weights[k], rtol=1e-14, atol=1e-14)


def test_renormalize_works_on_a_dtensor_shard_of_dim_0():
    """FSDP2 keeps each weight as a DTensor sharded on dim 0: renormalize_ must normalise the local rows in place
    without gathering them (a fake two-process group: a gather would not bring the other rows)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    FakeStore = pytest.importorskip("torch.testing._internal.distributed.fake_pg").FakeStore

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.manual_seed(0)
    conv = MPConv(3, 4, 3)
    full = conv.weight.detach() * torch.arange(1, 5.0)[:, None, None, None]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        conv.weight = torch.nn.Parameter(DTensor.from_local(full[:2].clone(), mesh, [Shard(0)], run_check=False))
        conv.renormalize_()
        assert isinstance(conv.weight, DTensor) and conv.weight.shape == (4, 3, 3, 3)
        torch.testing.assert_close(conv.weight.to_local(), normalize(full)[:2])
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("attn_resolutions,want", [
    ((), [4]),  # the first middle block always has attention (EDM2)
    ((8,), [8, 8, 8, 4]),  # encoder 1 + decoder 2 at 8x8, the middle block at 4x4
    ((4,), [4, 4, 4, 4]),  # encoder 1 + middle 1 + decoder 2 at 4x4
])
def test_layout_and_attention_placement(attn_resolutions, want):
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, **{**TINY, "attn_resolutions": attn_resolutions})
    assert [(b.resolution, b.resample) for b in net.enc] == [(8, "keep"), (4, "down"), (4, "keep")]
    assert [(b.resolution, b.resample) for b in net.dec] == [(4, "keep")] * 2 + [(8, "up")] + [(8, "keep")] * 2
    assert [b.resolution for b in net.mid] == [4, 4] and net.mid[1].heads == 0
    assert all(b.heads == 0 for b in [*net.enc, *net.dec] if b.resample != "keep")  # never on resampling blocks
    assert net.conv_in.weight.shape[1] == 2  # the image and the constant-ones channel
    salts = [int(b.dropout.salt) for b in [*net.enc, *net.mid, *net.dec]]
    assert len(set(salts)) == len(salts)
    seen = []
    for b in [*net.enc, *net.mid, *net.dec]:
        b.register_forward_hook(lambda m, args, out: seen.extend([m.resolution] * bool(m.heads)))
    net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert sorted(seen, reverse=True) == want


def test_zero_init_then_float32_matches_float64_reference():
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, **{**TINY, "attn_resolutions": (8, 4)}, num_classes=10)
    x, c, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 1.5, torch.tensor([0, 9, -1])
    out = net(x, c, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # out_gain = 0: F = 0 at init
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    ref = copy.deepcopy(net).double()(x.double(), c.double(), y)
    out = net(x, c, y)
    assert ref.abs().max() > 0.1
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_jvp_is_fused_and_matches_central_difference():
    net = _tiny_net(num_classes=10)
    x, c, labels = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64), torch.tensor([0, 7])
    rel, fused = jvp_vs_central_difference(lambda x, c: net(x, c, labels), x, c)
    assert rel < 1e-6
    assert fused == 7  # encoder 2 + middle 1 + decoder 4: every attention block's tangent came from the fused op


@pytest.mark.slow
def test_compiled_jvp_matches_eager(torch_defaults):
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, **{**TINY, "channel_mult": (1,), "attn_resolutions": (8,)})  # one level: faster to compile
    perturb_zero_init(net)
    compiled_jvp_vs_eager(net, torch.randn(2, 1, 8, 8), torch.rand(2), num_attn=4)


def test_time_embedding_and_modulation_stay_float32_under_autocast():
    """Under bf16 autocast t, the embedding and the adaptive double norm are float32, the body bf16 (docs/design.md)."""
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, num_classes=10, **TINY)
    seen: dict[str, torch.dtype] = {}
    block = net.enc[0]
    for name, mod in (("emb", net.emb), ("modulation", block.norm.scale), ("norm", block.norm), ("body", block.conv_res0)):
        mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, 8, 8), torch.rand(2) + 0.1, torch.tensor([1, 2]))
    assert seen == {"emb": torch.float32, "modulation": torch.float32, "norm": torch.float32, "body": torch.bfloat16}


def test_label_minus_one_is_the_null_class():
    net = _tiny_net(num_classes=10)
    x, c = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64)
    a, b = net(x, c, torch.tensor([1, 2])), net(x, c, torch.tensor([3, 2]))
    assert (a - b)[0].abs().max() > 1e-4 and torch.equal(a[1], b[1])
    null = net(x, c, torch.tensor([-1, -1]))
    with torch.no_grad():
        net.emb.label.weight.zero_()  # every label now embeds to zero, as the null class does
    torch.testing.assert_close(net(x, c, torch.tensor([3, 5])), null, rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)


def test_guidance_input_is_zero_at_init():
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, guidance_conditional=True, **TINY).double()
    perturb_zero_init(net, only="out_gain")
    assert isinstance(net.emb.guidance, torch.nn.Linear) and not net.emb.guidance.weight.any()
    x, c = torch.randn(2, 1, 8, 8, dtype=F64), torch.rand(2, dtype=F64)
    s1, s2 = torch.tensor([1.0, 1.5], dtype=F64), torch.tensor([2.0, 1.5], dtype=F64)
    assert torch.equal(net(x, c, guidance=s1), net(x, c, guidance=s2))
    perturb_zero_init(net, only="emb.guidance")
    a, b = net(x, c, guidance=s1), net(x, c, guidance=s2)
    assert (a - b)[0].abs().max() > 1e-4 and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="guidance") as e:
        net(x, c)
    assert "\n" not in str(e.value)
    assert EDM2UNet(8, 1, **TINY).emb.guidance is None


def test_a_guidance_student_of_arch_edm2_takes_guidance():
    spec = _spec(class_conditional=True)
    spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind="scd", teacher="x"))
    model = build_model(spec)
    assert model.takes_guidance and "net.emb.guidance.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("dropout_resolutions", [(4,), ()])
def test_dropout_only_at_dropout_resolutions(dropout_resolutions):
    torch.manual_seed(0)
    net = EDM2UNet(8, 1, dropout=0.5, dropout_resolutions=dropout_resolutions, **TINY).train()
    blocks = [*net.enc, *net.mid, *net.dec]
    on = {b.resolution for b in blocks} if not dropout_resolutions else set(dropout_resolutions)
    assert all((b.dropout.p == 0.5) == (b.resolution in on) for b in blocks)
    changed: dict[int, bool] = {}
    for b in blocks:
        b.dropout.register_forward_hook(lambda m, args, out, r=b.resolution: changed.__setitem__(r, changed.get(r, False) or not torch.equal(out, args[0])))
    net(torch.randn(2, 1, 8, 8), torch.rand(2), dropout_key=torch.tensor(7))
    assert {r for r, c in changed.items() if c} == on


def test_bad_configs_are_one_line_errors_naming_the_field():
    cases = [
        (dict(img_resolution=12, channel_mult=(1, 2, 3, 4)), "channel_mult"),
        (dict(attn_resolutions=(16,)), "attn_resolutions"),
        (dict(dropout_resolutions=(2,)), "dropout_resolutions"),
        (dict(head_dim=5), "head_dim"),  # 16 channels at 4x4 (the middle block's attention): 3 heads, uneven
        (dict(res_balance=1.5), "res_balance"),
        (dict(label_balance=-0.1), "label_balance"),
    ]
    for kw, field in cases:
        args = dict(img_resolution=8, channels=8, channel_mult=(1, 2), attn_resolutions=(), head_dim=4) | kw
        with pytest.raises(ValueError) as e:
            check_config(**args)
        assert str(e.value).startswith(f"{field}:") and "\n" not in str(e.value), str(e.value)
    msg = one_line_error(check_net, _spec(attn_resolutions=(16,)))
    assert msg.startswith("net.edm2.attn_resolutions:"), msg
    msg = one_line_error(check_net, _spec(concat_balance=2.0))
    assert msg.startswith("net.edm2.concat_balance:"), msg
    check_net(dataclasses.replace(_spec(), data=DataSpec(resolution=0)))  # shapes wait for the resolved spec


# ---------------------------------------------------------------------------------------------
# Training


def _spec(class_conditional: bool = False, **edm2) -> Spec:
    net = NetSpec(arch="edm2", dropout=0.1, class_conditional=class_conditional,
                  edm2=EDM2Spec(**{**TINY, "dropout_resolutions": (4,), **edm2}))
    return Spec(data=DataSpec(resolution=8, channels=1, num_classes=10), net=net)


@pytest.mark.parametrize("kind", ["sct", "diffusion"])
def test_trains_two_steps_with_the_real_step_and_renormalizes_after_the_update(kind, torch_defaults):
    spec = _spec(class_conditional=True)
    spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind=kind), optim=dataclasses.replace(spec.optim, lr=1e-2))
    torch.manual_seed(0)
    model = build_model(spec).train()
    with torch.no_grad():
        model.net.out_gain.fill_(0.5)  # non-zero F, so every weight gets a gradient
    step = TrainStep(model, spec, compile=False)
    mp = {k: m for k, m in model.net.named_modules() if isinstance(m, MPConv)}
    order: list[str] = []
    optimizer_step = step.optimizer.step
    step.optimizer.step = lambda *a, **k: (order.append("step"), optimizer_step(*a, **k))[1]
    renormalize = model.net.renormalize_
    step.renormalize = lambda: (order.append("renormalize"), renormalize())
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        before = {k: m.weight.detach().clone() for k, m in mp.items()}
        inp = StepInputs(torch.randn(8, 1, 8, 8, generator=g) * 0.5, torch.randn(8, 1, 8, 8, generator=g) * 0.5,
                         torch.rand(8, generator=g) * 1.5 + 0.02, torch.randint(-1, 10, (8,), generator=g),
                         torch.tensor(i), torch.tensor(0.5))
        out = step(inp)
        assert not out.skipped and torch.isfinite(out.loss) and out.grad_norm > 0
        for k, m in mp.items():
            assert not torch.equal(m.weight, before[k]), k  # the update moved it ...
            rms = m.weight.detach().flatten(1).square().mean(1)
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=1e-5)  # ... and it is back on its sphere
    assert order == ["step", "renormalize"] * 2


def test_a_skipped_update_decided_on_the_device_leaves_the_weights_as_they_were(torch_defaults):
    """The accelerators' update (guarded on the device) on the CPU: a NaN loss between two clean steps is skipped,
    the renormalisation after it too, and the run ends bit for bit where the host's decision ends it (a second
    renormalisation would move about a third of the weights by one ulp)."""
    spec = _spec(class_conditional=True)
    spec = dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, kind="radam"))
    ends = []
    for device_skip in (False, True):
        torch.manual_seed(0)
        model = build_model(spec).train()
        with torch.no_grad():
            model.net.out_gain.fill_(0.5)
        step = TrainStep(model, spec, compile=False, device_skip=device_skip)
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            inp = StepInputs(torch.randn(8, 1, 8, 8, generator=g) * 0.5, torch.randn(8, 1, 8, 8, generator=g) * 0.5,
                             torch.rand(8, generator=g) * 1.5 + 0.02, torch.randint(-1, 10, (8,), generator=g),
                             torch.tensor(i), torch.tensor(0.5))
            if i == 1:
                inp.x0.fill_(float("nan"))  # every sample masked: no update
                before = {k: v.detach().clone() for k, v in model.named_parameters()}
            out = step(inp)
            assert bool(out.skipped) == (i == 1)
            if i == 1:
                assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
        ends.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for k in ends[0]:
        assert torch.equal(ends[0][k], ends[1][k]), k
