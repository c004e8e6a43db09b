"""Helpers shared by the tests: tiny specs, CLI subprocesses, one-line error checks, tiny training runs,
and the network checks (finite-difference and compiled-vs-eager JVPs) used by the U-Net and DiT tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from scm_graph import ops
from scm_graph.ops.zero_tangents import COMPILE_OPTIONS
from scm_graph.spec import DataSpec, DiTSpec, NetSpec, Spec, UNetSpec

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"

TINY_UNET = dict(channels=8, channel_mult=(1, 2), num_blocks=1, norm_groups=4)
TINY_DIT = dict(width=16, depth=1, patch_size=2, head_dim=8, mlp_ratio=2.0)


def tiny_spec(arch: str = "unet", dropout: float = 0.0, class_conditional: bool = False, **arch_fields) -> Spec:
    """A resolved 1x8x8, 10-class spec with a tiny network; `arch_fields` are UNetSpec / DiTSpec fields."""
    if arch == "unet":
        net = NetSpec(arch="unet", dropout=dropout, class_conditional=class_conditional, unet=UNetSpec(**{**TINY_UNET, **arch_fields}))
    else:
        net = NetSpec(arch="dit", dropout=dropout, class_conditional=class_conditional, dit=DiTSpec(**{**TINY_DIT, **arch_fields}))
    return Spec(data=DataSpec(resolution=8, channels=1, num_classes=10), net=net)


# ---------------------------------------------------------------------------------------------
# CLI runs

# Shrinks any spec file to a tiny eager run (the caller adds root, out and total_images).
TINY_ARGS = [
    "--net.unet.channels", "8", "--net.unet.channel_mult", "1", "2", "--net.unet.num_blocks", "1",
    "--net.unet.norm_groups", "4", "--net.dit.width", "8", "--net.dit.depth", "1", "--net.dit.head_dim", "4",
    "--train.batch", "16", "--train.log_every_images", "16", "--train.eval_every_images", "0",
    "--train.eval_samples", "64", "--train.sample_every_images", "1000000", "--train.compile", "false",
    "--train.device", "cpu",
]


def tiny_args(root: Path, out: Path, total_images: int = 64, *extra: str) -> list[str]:
    """Overrides for a tiny eager run reading `root` and writing `out`."""
    return [*TINY_ARGS, "--data.root", str(root), "--train.out", str(out),
            "--train.total_images", str(total_images), *extra]


# A plain progress line (training: `--train.progress lines`, the default off a terminal; shard writing too).
PROGRESS_LINE = re.compile(r"\S.*?  \d+/\d+ img \(\d+%\)  \d+ img/s(  loss \S+)?  elapsed \S+  left \S+")


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one thread each, the session's classifier cache."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


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


def one_line_error(fn, *args) -> str:
    """The message of the UserError that fn(*args) raises, checked to be one non-empty line."""
    import pytest

    from scm_graph.errors import UserError

    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def cifarlike_source(n: int = 64, seed: int = 0, name: str = "cifar10"):
    """A small synthetic 3x32x32 labelled Source (random uint8 images, labels 0..9)."""
    from scm_graph.data.cifar10 import CIFAR10_CLASSES
    from scm_graph.data.source import Source

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    samples = ((images[i], int(labels[i])) for i in range(n))
    return Source(name, "synthetic cifar-like test set", (3, 32, 32), n, CIFAR10_CLASSES, samples)


class TorchDefaults:
    """One intra-op thread (the machine is shared) and float32 as the default dtype (another test module
    may have switched the process to float64 at import); both restored on exit."""

    def __enter__(self):
        self.threads, self.dtype = torch.get_num_threads(), torch.get_default_dtype()
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float32)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.dtype)


PAPER_SCT = ("--objective.P_std", "1.4", "--objective.adaptive_weighting", "true")
"""The paper's settings, which digits_sct's own default (P_std 1.0, adaptive weighting off) leaves."""


def train_tiny(spec_file: str, root: Path, out: Path, total_images: int = 64, *extra: str) -> Path:
    """A tiny eager training run through the CLI's entry point, in-process; returns its checkpoint."""
    from scm_graph.train.cli import main

    with TorchDefaults():
        main([str(SPECS / spec_file), *tiny_args(root, out, total_images, *extra)])
    return out / "ckpt.safetensors"


TIMING_KEYS = ("wall_s", "img_per_s", "teacher_share")
STEP_KEYS = ("loss", "grad_norm", "mse", "tangent_norm", "w_min", "w_max", "mse_by_t")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def step_records(run: Path) -> dict[int, dict]:
    """The metric lines (those with "loss" and no event), by step, without timing fields."""
    out: dict[int, dict] = {}
    for r in read_metrics(run):
        if "loss" in r and "event" not in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = {k: v for k, v in r.items() if k not in TIMING_KEYS}
    return out


def train_main(spec: str, *args: str) -> None:
    """`python -m scm_graph.train specs/<spec> args...`, in-process."""
    from scm_graph.train.cli import main

    main([str(SPECS / spec), *map(str, args)])


def assert_tensors_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Shard sets


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Network checks shared by tests/nets


def perturb_zero_init(net: torch.nn.Module, std: float = 0.1, seed: int = 0, only: str = "") -> None:
    """Fill every all-zero parameter (the zero-initialised output layers) whose name contains `only` with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if only in name and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def jvp_vs_central_difference(f, x: torch.Tensor, c: torch.Tensor, h: float = 1e-6) -> tuple[float, int]:
    """(relative error of torch.func.jvp's tangent against a central difference along (dx, dc), fused-op calls)."""
    g = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=g, dtype=x.dtype)
    dc = torch.randn(c.shape, generator=g, dtype=c.dtype)
    before = ops.calls["jvp:math"]
    with ops.use_backend("math"):
        _, tangent = torch.func.jvp(f, (x, c), (dx, dc))
    fused = ops.calls["jvp:math"] - before
    fd = (f(x + h * dx, c + h * dc) - f(x - h * dx, c - h * dc)) / (2 * h)  # dF ~ (F(p + h v) - F(p - h v)) / 2h
    return ((tangent - fd).norm() / fd.norm()).item(), fused


def compiled_jvp_vs_eager(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor, num_attn: int) -> None:
    """torch.compile(fullgraph) of jvp over functional_call, with the train step's zero-tangent pass, gives eager's
    primal and tangent, and the fused op runs when the compiled graph runs (counted on a second call, after tracing
    is done). Without the pass torch 2.11's CPU Inductor cannot lower a convolution whose weight tangent is an
    expanded zero."""
    g = torch.Generator().manual_seed(2)
    dx, dc = torch.randn(x.shape, generator=g), torch.randn(c.shape, generator=g)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def step(params, x, c, dx, dc):
        return torch.func.jvp(lambda x, c: functional_call(net, params, (x, c)), (x, c), (dx, dc))

    with ops.use_backend("math"):
        out_e, dout_e = step(params, x, c, dx, dc)
        compiled = torch.compile(step, fullgraph=True, options=COMPILE_OPTIONS)
        compiled(params, x, c, dx, dc)  # traces and compiles
        before = ops.calls["jvp:math"]
        out_c, dout_c = compiled(params, x, c, dx, dc)
        assert ops.calls["jvp:math"] - before == num_attn
    assert dout_e.abs().max() > 1e-3
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dout_c, dout_e, atol=1e-5, rtol=1e-5)


def make_tiny_vae(folder: Path, latent_channels: int = 4, levels: int = 4, seed: int = 0) -> Path:
    """A randomly initialised diffusers AutoencoderKL (downsampling 2^(levels-1), like the SD-VAE's 8 for
    levels=4), saved with `save_pretrained` to `folder` (no download); returns the folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    vae.save_pretrained(folder)
    return Path(folder)


def table_body(out: str, header_start: str) -> list[list[str]]:
    """The cells of the body rows of the first markdown table in `out` whose header line starts with `header_start`."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start)) + 2
    body = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split("|")])
    return body
