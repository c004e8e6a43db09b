"""FD_DINOv2 features with EDM2's protocol: DINOv2 ViT-L/14, its 1024 CLS features.

Preprocessing (EDM2, Karras et al. 2024, its default 'torch' resize): uint8 -> float, resize to 224 x 224
(bicubic, antialiased), x / 255, normalise by the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); grey images are
repeated to 3 channels. The network is built by torch.hub from a local copy of the facebookresearch/dinov2
repository (`source="local"`, `pretrained=False`) and its weights are read from
`dinov2_vitl14_pretrain.pth` in that folder (loaded with `weights_only=True`) or a `.safetensors` file of
the same name; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from scm_graph.errors import UserError, first_line
from scm_graph.eval.features import rgb

ENTRY = "dinov2_vitl14"  # the hubconf entry point
WEIGHTS = "dinov2_vitl14_pretrain"  # .pth (the published file) or .safetensors
RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPO_URL = "https://github.com/facebookresearch/dinov2"


def dinov2_files(path: str, flag: str = "--dinov2") -> tuple[Path, Path]:
    """(repository folder, weights file) of a local DINOv2; a one-line UserError saying what to put where."""
    if not path:
        raise UserError(f"FD_DINOv2 needs a local DINOv2: clone {REPO_URL}, put {WEIGHTS}.pth in it and pass its folder as {flag}")
    repo = Path(path).expanduser()
    if not (repo / "hubconf.py").is_file():
        raise UserError(f"{repo} is not a copy of {REPO_URL} (no hubconf.py); clone it there")
    for suffix in (".safetensors", ".pth"):
        if (repo / f"{WEIGHTS}{suffix}").is_file():
            return repo, repo / f"{WEIGHTS}{suffix}"
    raise UserError(f"the DINOv2 weights {repo / (WEIGHTS + '.pth')} are missing: put the published {WEIGHTS}.pth in {repo}")


def _state_dict(f: Path) -> dict[str, Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise UserError(f"cannot read the DINOv2 weights {f}: {first_line(e)}") from None


class DinoV2Features:
    """DINOv2 ViT-L/14 CLS features of uint8 images, preprocessed as EDM2 does."""

    metric = "fd_dinov2"

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        repo, f = dinov2_files(path)
        try:
            with torch.random.fork_rng(devices=[]):  # building the network must not move the global RNG
                model = torch.hub.load(str(repo), ENTRY, source="local", pretrained=False, trust_repo=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"torch.hub could not build {ENTRY} from {repo}: {first_line(e)}") from None
        try:
            model.load_state_dict(_state_dict(f))
        except (RuntimeError, TypeError) as e:  # TypeError: the file holds something other than a state_dict
            raise UserError(f"{f} does not fit {ENTRY}: {first_line(e)}") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dim = int(getattr(model, "embed_dim", 1024))
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> Tensor:
        x = rgb(images).to(self.device, torch.float32)
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)  # EDM2's 'torch' resize, in 0..255
        return (x / 255 - self.mean) / self.std  # [0, 1], then the ImageNet normalisation

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model(self.preprocess(images))
