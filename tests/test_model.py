"""The TrigFlow model: sigma_d and the input scaling, building networks from a spec, the network checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scm_graph.errors import UserError
from scm_graph.model import build_model, check_net
from scm_graph.nets.dit import DiT
from scm_graph.nets.embedding import PositionalEmbedding
from scm_graph.spec import (
    DataSpec,
    DiTSpec,
    EDM2Spec,
    NetSpec,
    ObjectiveSpec,
    Spec,
    validate,
)
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, perturb_zero_init, tiny_spec


def _resolved(spec: Spec, resolution: int = 8, channels: int = 1) -> Spec:
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=resolution, channels=channels))


def test_build_model_dit_from_spec():
    net = NetSpec(arch="dit", class_conditional=True, dit=DiTSpec(width=16, depth=3, patch_size=4, head_dim=8, mlp_ratio=2.0))
    spec = Spec(data=DataSpec(resolution=8, channels=3, num_classes=10), net=net)
    validate(spec)
    m = build_model(spec)
    assert isinstance(m.net, DiT) and len(m.net.blocks) == 3 and m.net.blocks[0].heads == 2
    assert m.net.patch_size == 4 and m.net.emb.label is not None and m.net.emb.guidance is None
    x = torch.randn(2, 3, 8, 8)
    assert m(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape


@pytest.mark.parametrize("name,arch,num_attn", [("digits_dit", "dit", 4), ("digits_sct_attn", "unet", 11)])
def test_new_spec_files_load_and_build(name, arch, num_attn):
    from scm_graph.nets.attention import SelfAttention2d

    spec = _resolved(read_spec_file(SPECS / f"{name}.py"))
    check_net(spec)
    assert spec.net.arch == arch and (spec.net.dit if arch == "dit" else spec.net.unet).head_dim == 32
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
        assert spec.net.unet.attn_resolutions == (16,) and spec.net.arch == "unet"
        check_net(_resolved(spec, 32, 3))


@pytest.mark.parametrize("args,needle", [
    (["--data.resolution", "8", "--net.unet.attn_resolutions", "16"], "net.unet.attn_resolutions"),
    (["--data.resolution", "8", "--net.unet.attn_resolutions", "4", "--net.unet.head_dim", "20"], "net.unet.head_dim"),  # 64 // 20 = 3 heads
    (["--data.resolution", "6", "--net.unet.channel_mult", "1", "2", "2"], "net.unet.channel_mult"),
    (["--net.unet.num_blocks", "0"], "net.unet.num_blocks must be positive"),
    (["--net.unet.channel_mult", "2", "0"], "net.unet.channel_mult must be positive"),
    (["--net.arch", "dit", "--net.dit.width", "32", "--net.dit.head_dim", "24"], "net.dit.head_dim"),
    (["--net.arch", "dit", "--net.dit.head_dim", "16", "--data.resolution", "8", "--net.dit.patch_size", "3"], "net.dit.patch_size"),
    (["--net.arch", "dit", "--net.dit.patch_size", "0"], "net.dit.patch_size must be positive"),
    (["--net.arch", "dit", "--net.dit.depth", "0"], "net.dit.depth must be positive"),
    (["--net.arch", "dit", "--net.dit.mlp_ratio", "nan"], "net.dit.mlp_ratio must be positive"),
])
def test_check_net_names_the_field(args, needle):
    spec = apply_overrides(read_spec_file(SPECS / "digits_sct.py"), args)
    with pytest.raises(UserError) as e:
        check_net(spec)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_check_net_reads_only_the_chosen_architecture():
    spec = apply_overrides(read_spec_file(SPECS / "digits_sct.py"), ["--net.dit.depth", "0", "--data.resolution", "8"])
    check_net(spec)  # a U-Net run ignores net.dit
    dit = apply_overrides(spec, ["--net.arch", "dit", "--net.dit.depth", "2", "--net.unet.num_blocks", "0"])
    check_net(dit)  # and a DiT run net.unet


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_model_owns_sigma_d_and_the_input_scaling(arch):
    """model(x_t, t) = F_theta(x_t / sigma_d, c_noise(t) = t): callers never scale x_t themselves."""
    spec = tiny_spec(arch, class_conditional=True)
    spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, sigma_d=0.7))
    torch.manual_seed(0)
    m = build_model(spec).double()
    perturb_zero_init(m.net)
    assert m.sigma_d == 0.7
    x_t, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 0.7, torch.rand(3, dtype=torch.float64) * 1.5, torch.tensor([1, 5, 9])
    F = m(x_t, t, y)
    assert torch.equal(F, m.net(x_t / 0.7, t, y))
    assert (F - m.net(x_t, t, y)).abs().max() > 1e-3  # the scaling matters for this network


# ----------------------------------------------------------------------------- net.time_scale


def _scaled_spec(arch: str, time_scale: float, guidance: bool = False) -> Spec:
    """A tiny class-conditional spec of `arch` with net.time_scale; `guidance`: an sCD student that takes the CFG scale."""
    if arch == "edm2":
        edm2 = EDM2Spec(channels=8, channel_mult=(1, 2), num_blocks=1, head_dim=4, attn_resolutions=(4,))
        spec = Spec(data=DataSpec(resolution=8, channels=1, num_classes=10),
                    net=NetSpec(arch="edm2", class_conditional=True, edm2=edm2))
    else:
        spec = tiny_spec(arch, class_conditional=True)
    spec = dataclasses.replace(spec, net=dataclasses.replace(spec.net, time_scale=time_scale))
    if guidance:
        spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind="scd", teacher="teacher.safetensors"))
    return spec


def _built(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(spec).double()
    perturb_zero_init(m)  # the zero-initialised outputs, w_phi and the guidance input: everything reaches F and w
    return m


def _embedding_inputs(m: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Every PositionalEmbedding's inputs, by module name, as the model runs (and the hook handles)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [mod.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(args[0]))
             for name, mod in m.named_modules() if isinstance(mod, PositionalEmbedding)]
    return seen, hooks


@pytest.mark.parametrize("arch", ["unet", "dit", "edm2"])
@pytest.mark.parametrize("s", [1000.0, 0.25])
def test_time_scale_scales_the_time_embeddings_input_and_nothing_else(arch, s):
    """net.time_scale s: the same weights, the backbone's and w_phi's positional embeddings see s t (the CFG
    scale input is not scaled), so model_s(x, t) is exactly model_1(x, s t); it does change F and w."""
    m1, ms = _built(_scaled_spec(arch, 1.0, guidance=True)), _built(_scaled_spec(arch, s, guidance=True))
    assert ms.time_scale == ms.w_phi.time_scale == s and m1.time_scale == m1.w_phi.time_scale == 1.0
    a, b = m1.state_dict(), ms.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no new weight, same init
    x, t = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0.05, 0.7, 1.5], dtype=torch.float64)
    y, g = torch.tensor([1, 5, 9]), torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    seen, hooks = _embedding_inputs(ms)
    F, w = ms(x, t, y, None, g, weight=True)
    for h in hooks:
        h.remove()
    net_emb = "net.emb.pos" if arch == "edm2" else "net.emb.noise"
    assert set(seen) == {net_emb, "w_phi.emb"}
    (c, s_in), (c_w,) = seen[net_emb], seen["w_phi.emb"]  # the time, then the CFG scale through the same embedding
    assert torch.equal(c, s * t) and torch.equal(c_w, s * t) and torch.equal(s_in, g)
    F1, w1 = m1(x, s * t, y, None, g, weight=True)
    assert torch.equal(F, F1) and torch.equal(w, w1)
    F1t, w1t = m1(x, t, y, None, g, weight=True)
    assert (F - F1t).abs().max() > 1e-6 and (w - w1t).abs().max() > 1e-6


def test_time_scale_one_is_the_identity():
    """The default passes t itself (no op): checkpoints without the field behave as before."""
    m = _built(_scaled_spec("unet", 1.0))
    seen, hooks = _embedding_inputs(m)
    t = torch.rand(2, dtype=torch.float64)
    m(torch.randn(2, 1, 8, 8, dtype=torch.float64), t, torch.tensor([0, 1]), weight=True)
    for h in hooks:
        h.remove()
    assert seen["net.emb.noise"][0] is t and seen["w_phi.emb"][0] is t
    assert Spec().net.time_scale == 1.0


def test_time_scale_scales_the_time_tangent():
    """Under torch.func.jvp (the sCT tangent) dF/dt of model_s is s dF/dc of model_1 at c = s t (chain rule)."""
    s = 1000.0
    m1, ms = _built(_scaled_spec("unet", 1.0)), _built(_scaled_spec("unet", s))
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([2, 7])
    t, dt = torch.tensor([0.3, 1.2], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    F, dF = torch.func.jvp(lambda tt: ms(x, tt, y), (t,), (dt,))
    F1, dF1 = torch.func.jvp(lambda cc: m1(x, cc, y), (s * t,), (s * dt,))
    torch.testing.assert_close(F, F1, rtol=0, atol=0)
    torch.testing.assert_close(dF, dF1, rtol=1e-12, atol=1e-12)
