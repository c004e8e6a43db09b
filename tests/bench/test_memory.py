"""`just bench memory`: closed-form weight / optimiser bytes, FSDP2 shares, and activation bytes measured on
meta-backed fake tensors that equal those measured on real CPU tensors with the same hooks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from scm_graph.bench import memory as M
from scm_graph.bench.cli import main as bench_main
from scm_graph.errors import UserError
from scm_graph.model import build_model, num_params
from scm_graph.precision import fp32_region
from tests.helpers import TorchDefaults, tiny_spec


@pytest.fixture(autouse=True)
def _one_thread():
    with TorchDefaults():
        yield


def _meta_shapes(spec) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(spec)
    return [tuple(p.shape) for p in model.parameters()]


def test_weights_gradients_optimiser_ema_are_closed_form():
    spec = tiny_spec(class_conditional=True, attn_resolutions=(4,), head_dim=8)
    shapes = _meta_shapes(spec)
    P = num_params(build_model(spec))
    assert sum(math.prod(s) for s in shapes) == P
    single = M.state_bytes(shapes, 1, "single")
    assert (single.params, single.grads, single.optim, single.ema) == (4 * P, 4 * P, 8 * P, 4 * P)
    assert single.total == 20 * P
    # replicated on every rank; DDP's buckets are the gradients' storage (gradient_as_bucket_view=True): no 24 P
    ddp = M.state_bytes(shapes, 8, "ddp")
    assert (ddp.params, ddp.grads, ddp.optim, ddp.ema) == (4 * P, 4 * P, 8 * P, 4 * P)
    assert ddp.total == 20 * P and ddp == single


def test_fsdp_shares_are_ddp_over_n():
    shapes = [(64, 32, 3, 3), (64,), (256, 64), (16, 8, 1, 1)]  # every dim 0 divides 8: no padding
    ddp, fsdp = M.state_bytes(shapes, 8, "ddp"), M.state_bytes(shapes, 8, "fsdp")
    for field in ("params", "grads", "optim", "ema"):
        assert getattr(fsdp, field) * 8 == getattr(ddp, field)
    assert fsdp.total * 8 == ddp.total
    # dim 0 not divisible by N: rank 0 holds ceil(d0 / N) rows, as FSDP2 pads every shard to
    assert M.shard_numel((10, 3), 4) == 3 * 3 and M.shard_numel((3,), 4) == 1 and M.shard_numel((), 4) == 1
    shapes = _meta_shapes(tiny_spec())
    ddp, fsdp = M.state_bytes(shapes, 3, "ddp"), M.state_bytes(shapes, 3, "fsdp")
    pad = sum(4 * math.prod(s[1:]) for s in shapes)  # at most one padded row per weight
    assert ddp.params / 3 <= fsdp.params <= ddp.params / 3 + pad
    assert fsdp.optim == 2 * fsdp.params and fsdp.grads == fsdp.ema == fsdp.params


def test_fsdp_transient_sizes_the_blocks_and_the_root():
    spec = tiny_spec(attn_resolutions=(4,), head_dim=8)
    with torch.device("meta"):
        model = build_model(spec)
    t = M.fsdp_transient(model)
    units = M.shard_units(model)
    assert len(units) == len(model.net.enc) + len(model.net.mid) + len(model.net.dec)
    assert t.full == 4 * num_params(model)
    assert t.largest_unit == 4 * max(num_params(u) for u in units)
    assert t.root == t.full - 4 * sum(num_params(u) for u in units)
    assert t.gradient_pass == 2 * t.root + 3 * t.largest_unit


def test_live_bytes_counts_what_is_alive_and_not_views_of_older_tensors():
    x = torch.randn(1000)
    with M.LiveBytes() as live:
        v = x.view(10, 100)  # a view of a tensor from before: no new memory
        assert live.live == 0
        y = x * 2
        z = y * 3
        assert live.live == 8000
        del y
        assert live.live == 4000
        w = z.view(-1)  # a view of a live storage: no new memory
        del z
        assert live.live == 4000  # w still holds the storage
        u = w + 1
        del w, u
    assert live.peak == 8000 and live.live == 0
    del v


def test_saved_bytes_of_a_linear_layer_are_its_input():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    saved = M.SavedTensors(list(lin.parameters()))
    with saved.count():
        F.silu(lin(x))  # linear saves x; silu saves its input
    assert saved.bytes.activations == (4 * 16 + 4 * 8) * 4
    assert saved.bytes.weights == 0  # x needs no gradient, so the weight is not saved
    saved = M.SavedTensors(list(lin.parameters()))
    with saved.count():
        lin(x.requires_grad_())
    assert saved.bytes.weights == 16 * 8 * 4  # the weight itself: no extra memory
    saved = M.SavedTensors(list(lin.parameters()))
    with saved.count(), M.step_precision("bf16"):
        lin(x)  # autocast: the bf16 copies of x and of the weight (its cached cast)
    assert saved.bytes.activations == 4 * 16 * 2 and saved.bytes.weight_copies == 16 * 8 * 2


def test_cuda_autocast_policy_runs_cuda_fp32_ops_in_fp32():
    x = torch.randn(2, 8, 4, 4)
    w = torch.randn(8, 8, 1, 1)
    with M.step_precision("bf16"):
        h = F.conv2d(x, w)
        assert h.dtype == torch.bfloat16  # lower precision, as on CUDA
        assert F.group_norm(h, 4).dtype == torch.float32  # CUDA: fp32 (CPU autocast alone keeps bf16)
        assert F.interpolate(h, scale_factor=2.0, mode="nearest").dtype == torch.float32
        assert F.silu(h).dtype == torch.bfloat16  # not on any list
        with fp32_region(h):
            assert F.conv2d(x, w).dtype == torch.float32
    with M.step_precision("fp32"):
        assert F.conv2d(x, w).dtype == torch.float32


def test_fsdp_units_are_the_trainers():
    from scm_graph.train import parallel

    assert M.shard_units is parallel.shard_units  # one definition of what FSDP2 wraps


def test_the_measured_passes_are_the_sct_objective():
    """What the tool measures is the distributed step's two passes: prepare (no gradient) on the plain weights,
    then forward with w_phi + finish; their loss and gradients are the sCT objective's."""
    from scm_graph.objectives import get_objective, get_passes
    from scm_graph.train.parallel import full_params

    spec = tiny_spec(dropout=0.1, class_conditional=True, attn_resolutions=(4,), head_dim=8)
    torch.manual_seed(0)
    model = build_model(spec).train()
    inp = M.step_inputs(spec, 3)
    with torch.no_grad():
        prep = get_passes("sct").prepare(model, full_params(model), inp, spec.objective)
    assert all(t.grad_fn is None for t in (prep.x_t, prep.F_minus, prep.g))  # nothing of the JVP pass is saved
    loss = M.gradient_pass(model, prep, spec.objective.adaptive_weighting)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert grads["w_phi.linear.weight"].abs().sum() > 0  # w_phi(t) came through the network's forward
    model.zero_grad(set_to_none=True)
    ref = get_objective("sct")(model, dict(model.named_parameters()), inp, spec.objective).loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, msg=k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_bytes_on_fake_tensors_equal_real_cpu(precision):
    """The same hooks on the same step: meta-backed fake tensors measure what real CPU tensors measure."""
    spec = tiny_spec(dropout=0.1, class_conditional=True, attn_resolutions=(4,), head_dim=8)
    fake = M.measure_activations(spec, 3, precision, fake=True)
    real = M.measure_activations(spec, 3, precision, fake=False)
    assert fake == real
    assert fake.saved.activations > 0 and fake.jvp_peak > 0 and fake.gradient_peak >= fake.saved.activations
    # the whole step holds the JVP pass's result (x_t, F^-, g: a few [B, C, H, W]) on top of the gradient pass
    assert fake.gradient_peak < fake.step_peak <= fake.gradient_peak * 1.05
    assert (fake.saved.weight_copies > 0) == (precision == "bf16")


def test_cli_table_with_overrides_and_a_latent_shape(capsys, tmp_path):
    out = tmp_path / "mem.md"
    bench_main(["memory", "--spec", "specs/digits_sct.py", "--ranks", "1", "4", "--batch", "2", "--precision", "bf16",
                "--shape", "4", "8", "8", "--classes", "10", "--net.class_conditional", "true", "--net.unet.channels", "8",
                "--net.unet.channel_mult", "1", "2", "--net.unet.num_blocks", "1", "--net.unet.norm_groups", "4",
                "--out", str(out)])
    text = capsys.readouterr().out
    spec = tiny_spec(class_conditional=True)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, channels=4), net=dataclasses.replace(
        spec.net, dropout=0.1))  # digits_sct's dropout, a 4-channel input
    with torch.device("meta"):
        P = num_params(build_model(spec))
    assert f"**{P:,} parameters**" in text and "data 4x8x8" in text
    assert "| per rank (GiB), bf16 | 1 process | 4 x DDP | 4 x FSDP2 |" in text
    assert "bf16 weight copies" in text
    assert "--net.unet.channels 8" in text  # the exact command is in the report
    assert out.read_text().strip() == text[text.index("## "):].strip()


def test_default_micro_batch_is_the_global_batch_over_ranks_and_micro_batches():
    spec = tiny_spec()
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch=64))
    assert list(M.micro_batches(spec, [1, 8]).values()) == [64, 8, 8]  # 1 process, 8 x DDP, 8 x FSDP2
    assert list(M.micro_batches(spec, [1, 8], batch=32).values()) == [32, 32, 32]
    with pytest.raises(UserError, match="no sample per rank"):
        M.micro_batches(spec, [128])
    if hasattr(spec.train, "accum"):  # gradient accumulation: 2048 images / 8 ranks / 8 micro-batches = 32
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch=2048, accum=8))
        assert list(M.micro_batches(spec, [1, 8]).values()) == [256, 32, 32]


@pytest.mark.parametrize("args, msg", [
    (["--spec", "specs/my_images_sct.py"], "--shape C H W"),
    (["--shape", "4", "8", "6"], "square"),
    (["--ranks", "0"], "--ranks"),
    (["--net.class_conditional", "true", "--shape", "1", "8", "8"], "--classes"),
])
def test_cli_bad_input_is_one_line(args, msg):
    with pytest.raises(UserError, match=msg.replace("-", r"\-")):
        M.main.__wrapped__(args)
