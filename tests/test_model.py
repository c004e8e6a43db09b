"""The TrigFlow model: sigma_d and the input scaling, building networks from a spec, the network checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scm_graph.errors import UserError
from scm_graph.model import build_model, check_net
from scm_graph.nets.dit import DiT
from scm_graph.spec import DataSpec, DiTSpec, NetSpec, Spec, validate
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
