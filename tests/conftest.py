import os

# Triton kernels run in its interpreter on CPU; triton reads this when a kernel is decorated,
# so it must be set before scm_graph.ops imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from scm_graph.model import build_model
from scm_graph.spec import DataSpec, NetSpec, Spec


def tiny_spec(**net) -> Spec:
    n = dict(channels=8, channel_mult=(1, 2), num_blocks=1, norm_groups=4)
    n.update(net)
    return Spec(data=DataSpec(resolution=8, channels=1, num_classes=10), net=NetSpec(**n))


@pytest.fixture
def tiny_model64():
    """A small U-Net in float64 with non-zero output weights (so F is not identically 0)."""
    torch.manual_seed(0)
    m = build_model(tiny_spec()).double()
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.1)
        m.w_phi.linear.weight.normal_(0, 0.1)
    return m


# ---------------------------------------------------------------------------------------------
# Shared fixtures for the train / sample / eval / spec tests: shard sets and tiny trained runs in
# tmp folders, a session-wide digits-classifier cache, and helpers for CLI subprocesses.

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"

# Shrinks any spec file to a tiny eager run (the caller adds root, out and total_images).
TINY_ARGS = [
    "--net.channels", "8", "--net.channel_mult", "1", "2", "--net.num_blocks", "1", "--net.norm_groups", "4",
    "--train.batch", "16", "--train.log_every_images", "16", "--train.eval_every_images", "0",
    "--train.eval_samples", "64", "--train.sample_every_images", "1000000", "--train.compile", "false",
    "--train.device", "cpu",
]


def tiny_args(root: Path, out: Path, total_images: int = 64, *extra: str) -> list[str]:
    """Overrides for a tiny eager run reading `root` and writing `out`."""
    return [*TINY_ARGS, "--data.root", str(root), "--train.out", str(out),
            "--train.total_images", str(total_images), *extra]


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one thread each, the session's classifier cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("SCM_PROGRESS", None)
    return env


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in a subprocess, text output captured."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd or REPO), env=cli_env())


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line `error: ...` (containing every needle); returns it."""
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def cifarlike_source(n: int = 64, seed: int = 0, name: str = "cifar10"):
    """A small synthetic 3x32x32 labelled Source (random uint8 images, labels 0..9)."""
    from scm_graph.shard import CIFAR10_CLASSES, Source

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    samples = ((images[i], int(labels[i])) for i in range(n))
    return Source(name, "synthetic cifar-like test set", (3, 32, 32), n, CIFAR10_CLASSES, samples)


class _TorchDefaults:
    """One intra-op thread (the machine is shared) and float32 as the default dtype (another test module
    may have switched the process to float64 at import); both restored on exit."""

    def __enter__(self):
        self.threads, self.dtype = torch.get_num_threads(), torch.get_default_dtype()
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float32)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.dtype)


@pytest.fixture
def torch_defaults():
    """Run a test with one thread and float32 default dtype (see _TorchDefaults)."""
    with _TorchDefaults():
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
    from scm_graph.shard import digits_source, write_set

    root = tmp_path_factory.mktemp("shards")
    write_set(digits_source(), out=root, progress=False)
    write_set(cifarlike_source(), out=root, progress=False)
    return root


def _train_tiny(spec_file: str, root: Path, out: Path, total_images: int = 64, *extra: str) -> Path:
    import scm_graph.train

    with _TorchDefaults():
        scm_graph.train.main([str(SPECS / spec_file), *tiny_args(root, out, total_images, *extra)])
    return out / "ckpt.safetensors"


@pytest.fixture(scope="session")
def sct_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny digits sCT run (4 eager steps of 16 images); returns its checkpoint."""
    return _train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "sct")


@pytest.fixture(scope="session")
def diffusion_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny digits diffusion run (4 eager steps of 16 images); returns its checkpoint."""
    return _train_tiny("digits_diffusion.py", shard_root, tmp_path_factory.mktemp("run") / "diffusion")


@pytest.fixture(scope="session")
def cifarlike_ckpt(tmp_path_factory, shard_root, scm_cache) -> Path:
    """A tiny 3x32x32 sCT run (digits_sct spec on the synthetic cifar10 set, 2 steps)."""
    return _train_tiny("digits_sct.py", shard_root, tmp_path_factory.mktemp("run") / "cifarlike", 32,
                       "--data.name", "cifar10")
