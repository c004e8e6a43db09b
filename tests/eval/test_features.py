"""The feature networks (scm_graph.eval.features / registry / dinov2) on a tiny DINOv2 stand-in hub repo.

The stand-in is a folder shaped like a local clone of facebookresearch/dinov2: a `hubconf.py` whose
`dinov2_vitl14(pretrained=...)` builds a small randomly initialised ViT-like network (a patch-14 conv
embedding plus a position embedding, tanh, a linear head on the 256 patch tokens; `embed_dim` 32) and refuses `pretrained=True` (that would
download), plus `dinov2_vitl14_pretrain.pth` (or `.safetensors`) holding a seeded state_dict. The other test
modules of tests/eval import `make_dinov2_standin`, `load_standin` and `standin_features` from here.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scm_graph.errors import UserError
from scm_graph.eval.dinov2 import DinoV2Features
from scm_graph.eval.features import COLUMN, METRICS, FeatureWeights, check_metrics, rgb
from scm_graph.eval.registry import check_weights, feature_net
from tests.helpers import one_line_error

pytestmark = pytest.mark.usefixtures("torch_defaults")

STANDIN_DIM = 32

HUBCONF = '''"""A stand-in for facebookresearch/dinov2's hubconf.py (scm_graph tests): a tiny random ViT-like network."""
import torch
from torch import nn

dependencies = ["torch"]


class TinyViT(nn.Module):
    def __init__(self, embed_dim=32):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=14, stride=14)
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, embed_dim, 16, 16))
        self.head = nn.Linear(embed_dim * 16 * 16, embed_dim)

    def forward(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 224, 224) or x.dtype != torch.float32:
            raise ValueError(f"expected float32 [N, 3, 224, 224], got {x.dtype} {tuple(x.shape)}")
        h = torch.tanh(self.patch_embed(x) + self.pos_embed)  # [N, D, 16, 16]: 16 x 16 patches of 14 x 14
        return self.head(h.flatten(1))  # a linear head on all the patch tokens (a mean pool loses too much: singular covariances)


def dinov2_vitl14(pretrained=True, **kwargs):
    if pretrained:
        raise RuntimeError("the stand-in has no published weights: pretrained=True would download them")
    return TinyViT(**kwargs)
'''

WEIGHTS = "dinov2_vitl14_pretrain"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _hub_module(repo: Path):
    spec = importlib.util.spec_from_file_location(f"standin_hubconf_{abs(hash(str(repo)))}", repo / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeded_state(repo: Path, seed: int, embed_dim: int = STANDIN_DIM) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in _hub_module(repo).TinyViT(embed_dim).state_dict().items()}


def make_dinov2_standin(folder: Path, fmt: str = "pth", seed: int = 1234, embed_dim: int = STANDIN_DIM) -> Path:
    """`folder` as a local DINOv2 clone: hubconf.py and the seeded weights (`fmt` "pth", "safetensors" or "" for none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(HUBCONF)
    if fmt:
        state = _seeded_state(folder, seed, embed_dim)
        if fmt == "pth":
            torch.save(state, folder / f"{WEIGHTS}.pth")
        else:
            from safetensors.torch import save_file

            save_file(state, str(folder / f"{WEIGHTS}.safetensors"))
    return folder


def load_standin(repo: Path) -> torch.nn.Module:
    """The stand-in network with the repo's weights, built without torch.hub (an independent path)."""
    repo = Path(repo)
    model = _hub_module(repo).dinov2_vitl14(pretrained=False)
    if (repo / f"{WEIGHTS}.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(repo / f"{WEIGHTS}.safetensors"))
    else:
        state = torch.load(repo / f"{WEIGHTS}.pth", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def standin_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """EDM2's FD_DINOv2 preprocessing written out: grey -> RGB, bicubic antialiased resize to 224 in 0..255,
    / 255, ImageNet mean / std; then the network."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, (224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def dinov2_repo(tmp_path_factory) -> Path:
    return make_dinov2_standin(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture
def no_download(monkeypatch):
    """Any torch.hub download raises."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    for name in ("download_url_to_file", "load_state_dict_from_url", "_download_url_to_file"):
        if hasattr(torch.hub, name):
            monkeypatch.setattr(torch.hub, name, refuse)


def _images(n: int, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- the interface


def test_metric_names_and_checks():
    assert METRICS == ("fd_digits", "fid", "fd_dinov2") and set(COLUMN) == set(METRICS) and COLUMN["fd_digits"] == "fd"
    check_metrics(["fd_digits", "fd_dinov2"])
    assert one_line_error(check_metrics, ["fd_digits", "kid"]) == "unknown metric 'kid'; choose from fd_digits, fid, fd_dinov2"
    assert "listed twice" in one_line_error(check_metrics, ["fid", "fid"])
    grey = _images(2, 1)
    assert torch.equal(rgb(grey), grey.repeat(1, 3, 1, 1)) and rgb(_images(2)).shape == (2, 3, 16, 16)
    for bad in (torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4, dtype=torch.uint8)):
        assert "[N, 1 or 3, H, W]" in one_line_error(rgb, bad)


def test_check_weights_names_the_flag(tmp_path: Path):
    """check_weights is cheap (files only) and names the option that sets a missing file."""
    check_weights(["fd_digits"], FeatureWeights())
    msg = one_line_error(check_weights, ["fd_digits", "fd_dinov2"], FeatureWeights())
    assert "--dinov2" in msg and "https://github.com/facebookresearch/dinov2" in msg
    msg = one_line_error(check_weights, ["fid"], FeatureWeights(inception=str(tmp_path)))
    assert str(tmp_path / "inception-2015-12-05.pt") in msg and "https://nvlabs-fi-cdn.nvidia.com/" in msg
    assert "as --dino" in one_line_error(check_weights, ["fd_dinov2"], FeatureWeights(), ("--inc", "--dino"))


# ----------------------------------------------------------------------------- DINOv2 (the stand-in)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_dinov2_loads_locally_and_matches_an_independent_computation(tmp_path: Path, fmt: str, no_download):
    repo = make_dinov2_standin(tmp_path / fmt, fmt)
    net = feature_net("fd_dinov2", FeatureWeights(dinov2=str(repo)))
    assert isinstance(net, DinoV2Features) and net.metric == "fd_dinov2" and net.dim == STANDIN_DIM
    # the weights are the file's, not the hubconf's random initialisation
    saved = _seeded_state(repo, 1234)
    got = net.model.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert not torch.equal(_seeded_state(repo, 99)["head.weight"], saved["head.weight"])
    images = _images(5, side=20)
    feats = net(images)
    assert feats.shape == (5, STANDIN_DIM) and feats.dtype == torch.float32
    expected = standin_features(load_standin(repo), images)
    torch.testing.assert_close(feats, expected, rtol=1e-6, atol=1e-6)
    assert feats.std(0).min() > 0  # the features vary over images
    # one image at a time gives the same features (no cross-image mixing)
    torch.testing.assert_close(torch.cat([net(images[i : i + 1]) for i in range(5)]), feats, rtol=1e-5, atol=1e-6)


def test_safetensors_weights_win_over_pth(tmp_path: Path):
    repo = make_dinov2_standin(tmp_path / "both", "pth", seed=1)
    make_dinov2_standin(repo, "safetensors", seed=2)
    net = DinoV2Features(str(repo))
    assert torch.equal(net.model.state_dict()["head.weight"], _seeded_state(repo, 2)["head.weight"])


def test_grey_images_are_repeated_to_rgb(dinov2_repo: Path):
    net = DinoV2Features(str(dinov2_repo))
    grey = _images(4, c=1, side=8)
    torch.testing.assert_close(net(grey), net(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    torch.testing.assert_close(net(grey), standin_features(load_standin(dinov2_repo), grey), rtol=1e-6, atol=1e-6)
    assert "[N, 1 or 3, H, W]" in one_line_error(net, torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


def test_building_dinov2_does_not_move_the_global_rng(dinov2_repo: Path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    DinoV2Features(str(dinov2_repo))
    assert torch.equal(torch.get_rng_state(), before)


def test_dinov2_errors_are_one_line(tmp_path: Path):
    assert "clone https://github.com/facebookresearch/dinov2" in one_line_error(DinoV2Features, "")
    (tmp_path / "empty").mkdir()
    assert one_line_error(DinoV2Features, str(tmp_path / "empty")) == (
        f"{tmp_path / 'empty'} is not a copy of https://github.com/facebookresearch/dinov2 (no hubconf.py); clone it there")
    bare = make_dinov2_standin(tmp_path / "bare", fmt="")
    assert one_line_error(DinoV2Features, str(bare)) == (
        f"the DINOv2 weights {bare / (WEIGHTS + '.pth')} are missing: put the published {WEIGHTS}.pth in {bare}")
    # weights of the wrong shape (a 16-wide network's) and of a missing layer
    wrong = make_dinov2_standin(tmp_path / "wrong", embed_dim=16)
    msg = one_line_error(DinoV2Features, str(wrong))
    assert msg.startswith(f"{wrong / (WEIGHTS + '.pth')} does not fit dinov2_vitl14"), msg
    partial = make_dinov2_standin(tmp_path / "partial", fmt="")
    state = _seeded_state(partial, 0)
    del state["head.bias"]
    torch.save(state, partial / f"{WEIGHTS}.pth")
    assert "does not fit dinov2_vitl14" in one_line_error(DinoV2Features, str(partial))
    tensor = make_dinov2_standin(tmp_path / "tensor", fmt="")
    torch.save(torch.zeros(3), tensor / f"{WEIGHTS}.pth")  # a readable file that holds no state_dict
    assert "does not fit dinov2_vitl14" in one_line_error(DinoV2Features, str(tensor))
    # a weights file that is not one
    junk = make_dinov2_standin(tmp_path / "junk", fmt="")
    (junk / f"{WEIGHTS}.pth").write_bytes(b"not a checkpoint\n" * 3)
    assert one_line_error(DinoV2Features, str(junk)).startswith(f"cannot read the DINOv2 weights {junk / (WEIGHTS + '.pth')}: ")
    (junk / f"{WEIGHTS}.safetensors").write_bytes(b"\x00" * 16)
    assert one_line_error(DinoV2Features, str(junk)).startswith(f"cannot read the DINOv2 weights {junk / (WEIGHTS + '.safetensors')}: ")
    # a hubconf without the entry point, and one that fails to import
    for name, text in (("noentry", "dependencies = []\n"), ("broken", "import no_such_module_xyz\n")):
        repo = make_dinov2_standin(tmp_path / name)
        (repo / "hubconf.py").write_text(text)
        assert one_line_error(DinoV2Features, str(repo)).startswith(f"torch.hub could not build dinov2_vitl14 from {repo}: ")


def test_preprocessing_is_edm2s(dinov2_repo: Path):
    """preprocess(): float32 [N, 3, 224, 224], the resize and normalisation written out here; any input side."""
    net = DinoV2Features(str(dinov2_repo))
    for side, c in itertools.product((8, 32, 300), (1, 3)):
        images = _images(2, c=c, side=side, seed=side)
        x = net.preprocess(images)
        assert x.dtype == torch.float32 and x.shape == (2, 3, 224, 224)
        ref = F.interpolate(images.float().expand(-1, 3, -1, -1), (224, 224), mode="bicubic", antialias=True) / 255
        ref = (ref - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError):
        net.preprocess(torch.zeros(8, 8, dtype=torch.uint8))
