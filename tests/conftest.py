"""Fixtures shared by the suite; helper functions live in tests/helpers.py."""

import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# decorated, so it is set before anything imports scm_graph.ops; on a CUDA machine the real kernels run
# (export TRITON_INTERPRET=1 to force the interpreter there too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from scm_graph.model import build_model  # noqa: E402
from tests.helpers import TorchDefaults, cifarlike_source, tiny_spec, train_tiny  # noqa: E402


@pytest.fixture
def tiny_model64():
    """A small U-Net in float64 with non-zero output weights (so F is not identically 0)."""
    torch.manual_seed(0)
    m = build_model(tiny_spec()).double()
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.1)
        m.w_phi.linear.weight.normal_(0, 0.1)
    return m


@pytest.fixture
def torch_defaults():
    """Run a test with one thread and float32 default dtype (see TorchDefaults)."""
    with TorchDefaults():
        yield


@pytest.fixture(scope="session")
def scm_cache(tmp_path_factory) -> Path:
    """SCM_GRAPH_CACHE -> a session tmp folder, so the digits classifier is trained once per session."""
    path = tmp_path_factory.mktemp("scm_cache")
    old = os.environ.get("SCM_GRAPH_CACHE")
    os.environ["SCM_GRAPH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SCM_GRAPH_CACHE", None)
    else:
        os.environ["SCM_GRAPH_CACHE"] = old


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    """A shard root holding `digits` (1797 x 1x8x8) and a synthetic `cifar10` (64 x 3x32x32)."""
    from scm_graph.data.digits import digits_source
    from scm_graph.data.writer import write_set

    root = tmp_path_factory.mktemp("shards")
    write_set(digits_source(), out=root, progress=False)
    write_set(cifarlike_source(), out=root, progress=False)
    return root


@pytest.fixture(scope="session")
def sct_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny digits sCT run (4 eager steps of 16 images); returns its checkpoint."""
    return train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "sct")


@pytest.fixture(scope="session")
def diffusion_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny digits diffusion run (4 eager steps of 16 images); returns its checkpoint."""
    return train_tiny("digits_diffusion.py", shard_root, tmp_path_factory.mktemp("run") / "diffusion")


@pytest.fixture(scope="session")
def cifarlike_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny 3x32x32 sCT run (digits_sct spec on the synthetic cifar10 set, 2 steps)."""
    return train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "cifarlike", 32,
                      "--data.name", "cifar10")
