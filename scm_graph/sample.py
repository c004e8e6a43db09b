"""Sampling: multistep consistency sampling and PF-ODE solvers; `python -m scm_graph.sample`.

Consistency models (Song et al. 2023, Alg. 1 multistep; sCM Sec. 6): x = sigma_d n at t_max,
x0 = f(x, t_max), then for each later t_i: x = cos t_i x0 + sin t_i sigma_d n, x0 = f(x, t_i).
Diffusion models integrate dx_t/dt = sigma_d F(x_t / sigma_d, t) from t_max to 0 (Euler or Heun) on the
EDM time grid (rho = 7, sigma in [0.002, 80]) mapped to TrigFlow by t = arctan(sigma / sigma_d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scm_graph import trigflow
from scm_graph.checkpoint import load_checkpoint
from scm_graph.data import denormalize
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.model import TrigFlowModel, build_model, copy_params
from scm_graph.spec import Spec, spec_from_json


@dataclass
class Generator:
    """A model ready to sample, rebuilt from a checkpoint alone."""

    model: TrigFlowModel
    spec: Spec
    device: torch.device

    @property
    def sigma_d(self) -> float:
        return self.spec.objective.sigma_d

    @property
    def is_consistency(self) -> bool:
        return self.spec.objective.kind != "diffusion"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"bad device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available")
    return dev


def load_generator(ckpt_path: str | Path, ema: bool = True, device: str = "auto") -> Generator:
    ckpt = load_checkpoint(ckpt_path)
    spec = spec_from_json(ckpt.spec_json)
    dev = pick_device(device)
    model = build_model(spec)
    weights = ckpt.ema if ema and ckpt.ema is not None else ckpt.net
    try:
        copy_params(model, weights)
    except ValueError as e:
        raise UserError(f"{ckpt_path}: {e}") from None
    return Generator(model.to(dev).eval(), spec, dev)


def consistency_times(steps: int, sigma_d: float) -> list[float]:
    """1 step: [t_max]; 2 steps: [t_max, 1.1] (sCM); more: t_max then evenly spaced down to 1.1's spacing."""
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if steps == 1:
        return [trigflow.t_max(sigma_d)]
    if steps == 2:
        return [trigflow.t_max(sigma_d), trigflow.T_MID]
    mids = np.linspace(trigflow.T_MID, 0.0, steps, endpoint=False)
    return [trigflow.t_max(sigma_d)] + [float(t) for t in mids[: steps - 1]]


def ode_times(steps: int, sigma_d: float, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """EDM grid sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then t = arctan(sigma/sigma_d), then 0."""
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if steps == 1:
        return [math.atan(sigma_max / sigma_d), 0.0]
    i = np.arange(steps)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(t) for t in np.arctan(sig / sigma_d)] + [0.0]


def _F(g: Generator, x: Tensor, t: float, labels: Tensor | None) -> Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    return g.model(x / g.sigma_d, tt, labels)


@torch.no_grad()
def sample_consistency(g: Generator, noise: list[Tensor], times: list[float], labels: Tensor | None = None) -> Tensor:
    """Multistep consistency sampling; `noise[i]` are unit normals, one per time."""
    sd = g.sigma_d
    x = sd * noise[0]  # x ~ N(0, sigma_d^2 I) at t_max
    x0 = trigflow.consistency_fn(x, torch.full((x.shape[0],), times[0], device=x.device), _F(g, x, times[0], labels), sd)
    for t_i, n in zip(times[1:], noise[1:]):
        x = math.cos(t_i) * x0 + math.sin(t_i) * sd * n  # re-noise to t_i
        x0 = trigflow.consistency_fn(x, torch.full((x.shape[0],), t_i, device=x.device), _F(g, x, t_i, labels), sd)
    return x0


@torch.no_grad()
def sample_ode(g: Generator, noise: Tensor, times: list[float], solver: str = "heun", labels: Tensor | None = None) -> Tensor:
    """Integrate the PF-ODE dx/dt = sigma_d F (Eq. 3) over `times` (decreasing, ending at 0)."""
    sd = g.sigma_d
    x = sd * noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        h = t_next - t_cur
        d = trigflow.pf_ode_velocity(_F(g, x, t_cur, labels), sd)
        x_next = x + h * d  # Euler
        if solver == "heun" and t_next > 0:
            d2 = trigflow.pf_ode_velocity(_F(g, x_next, t_next, labels), sd)
            x_next = x + h * 0.5 * (d + d2)  # Heun (trapezoidal) correction
        x = x_next
    return x


def nfe(g: Generator, steps: int, solver: str) -> int:
    """Network evaluations per sample: consistency steps, Euler N, Heun 2N - 1."""
    if g.is_consistency:
        return steps
    return steps if solver == "euler" else 2 * steps - 1


def generate(
    g: Generator,
    n: int,
    *,
    steps: int = 2,
    times: list[float] | None = None,
    solver: str = "heun",
    seed: int = 0,
    batch: int = 1024,
    labels: Tensor | None = None,
) -> Tensor:
    """n samples in model units on the CPU. Deterministic in `seed` (noise drawn on the CPU)."""
    d = g.spec.data
    shape = (d.channels, d.resolution, d.resolution)
    if g.spec.net.class_conditional and labels is None:
        labels = torch.arange(n) % d.num_classes
    if times:
        times = [float(t) for t in times] + ([] if g.is_consistency else [0.0])
    else:
        times = consistency_times(steps, g.sigma_d) if g.is_consistency else ode_times(steps, g.sigma_d)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        lab = None if labels is None else labels[start : start + b].to(g.device)
        if g.is_consistency:
            noise = [torch.randn(b, *shape, generator=gen).to(g.device) for _ in times]
            x = sample_consistency(g, noise, times, lab)
        else:
            x = sample_ode(g, torch.randn(b, *shape, generator=gen).to(g.device), times, solver, lab)
        out.append(x.float().cpu())
    return torch.cat(out)


def to_uint8(x: Tensor, spec: Spec) -> Tensor:
    """Model units -> stored uint8 units."""
    return denormalize(x, spec.data, spec.objective.sigma_d).round().clamp(0, 255).to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, min_side: int = 64, pad: int | None = None) -> None:
    """Save uint8 [N, C, H, W] as one PNG grid; tiny images are upscaled (nearest) to `min_side`.

    Cells are separated by `pad` white pixels (default: half the upscale factor, at least 1).
    """
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = max(1, min_side // h)
    pad = max(1, scale // 2) if pad is None else pad
    H, W = h * scale, w * scale
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, c), 255, dtype=np.uint8)
    imgs = images.permute(0, 2, 3, 1).numpy().repeat(scale, 1).repeat(scale, 2)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + q * (W + pad) : pad + q * (W + pad) + W] = imgs[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors) written by training")
    p.add_argument("--steps", type=int, default=2, help="consistency steps (1, 2, ...) or ODE steps for a diffusion model")
    p.add_argument("--times", type=float, nargs="+", help="explicit sampling times, decreasing (overrides --steps)")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="PF-ODE solver for diffusion checkpoints")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="grid.png", help="grid PNG to write")
    p.add_argument("--npz", help="also write the raw samples (uint8 NCHW under 'samples', model units under 'x') here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the training weights instead of the EMA")
    p.add_argument("--label", type=int, help="class label for all samples (class-conditional models)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.n < 1:
        raise UserError("--n must be at least 1")
    if a.times and any(not 0 < t <= math.pi / 2 for t in a.times):
        raise UserError("--times must lie in (0, pi/2]")
    if a.times and any(b >= c for c, b in zip(a.times, a.times[1:])):
        raise UserError("--times must strictly decrease")
    g = load_generator(a.ckpt, ema=not a.raw, device=a.device)
    labels = None
    if a.label is not None:
        if not g.spec.net.class_conditional:
            raise UserError("--label given but this model is unconditional")
        if not 0 <= a.label < g.spec.data.num_classes:
            raise UserError(f"--label must be in [0, {g.spec.data.num_classes})")
        labels = torch.full((a.n,), a.label, dtype=torch.int64)
    x = generate(g, a.n, steps=a.steps, times=a.times, solver=a.solver, seed=a.seed, batch=a.batch, labels=labels)
    imgs = to_uint8(x, g.spec)
    save_grid(imgs, a.out)
    if a.npz:
        np.savez(a.npz, samples=imgs.numpy(), x=x.numpy())
    what = f"{len(a.times)} given times" if a.times else f"{a.steps} step(s)"
    kind = "consistency" if g.is_consistency else f"PF-ODE {a.solver}"
    print(f"wrote {a.out} ({a.n} samples, {kind}, {what}{', ' + a.npz if a.npz else ''})")


if __name__ == "__main__":
    main()
