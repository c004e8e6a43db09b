"""`python -m scm_graph.sample --ckpt run/ckpt.safetensors [--steps 2 [--t-mid T] | --times ...] --out grid.png [--npz x.npz] [--vae DIR]`.

Latent models (trained on SD-VAE latent shards) sample latents and decode them through the VAE the
checkpoint records (`data.vae`), or the one `--vae` names; the VAE is loaded before sampling starts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.paths import output_file, write_atomic
from scm_graph.sample.generate import (
    check_guidance,
    check_sampler_t_mid,
    generate,
    load_decoder,
    load_generator,
    to_images,
)
from scm_graph.sample.grid import save_grid


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.sample", description="Sample a checkpoint: multistep consistency sampling or a PF-ODE solver.")
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors) written by training")
    p.add_argument("--steps", type=int, default=2, help="consistency steps (1, 2, ...) or ODE steps for a diffusion model")
    p.add_argument("--times", type=float, nargs="+", help="explicit sampling times, decreasing (overrides --steps)")
    p.add_argument("--t-mid", type=float, default=None,
                   help="consistency models: the intermediate time of 2 (or more) steps, in (0, t_max) "
                        "(default: the checkpoint's train.eval_t_mid, 1.1 for older checkpoints)")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="PF-ODE solver for diffusion checkpoints")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="grid.png", help="grid PNG to write (its folder is created; an existing file is replaced)")
    p.add_argument("--npz", help="also write the samples (uint8 NCHW images under 'samples', model units under 'x': "
                                 "latents for a latent model) here")
    p.add_argument("--vae", help="latent models: the diffusers AutoencoderKL folder that decodes the samples "
                                 "(default: the checkpoint's data.vae)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the training weights instead of the EMA")
    p.add_argument("--label", type=int, nargs="+", help="class labels for the samples, cycled (class-conditional models; default: all classes in turn)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale s for a class-conditional diffusion model (1 = none; its training used label dropout)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--ignore-checksum", action="store_true", help="load a checkpoint whose data does not match its checksum")
    a = p.parse_args(argv)
    for flag, v in (("--n", a.n), ("--batch", a.batch), ("--steps", a.steps)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, not {v}")
    if a.times and any(not 0 < t <= math.pi / 2 for t in a.times):
        raise UserError(f"--times must lie in (0, pi/2], not {' '.join(map(str, a.times))}")
    if a.times and any(b >= c for c, b in zip(a.times, a.times[1:])):
        raise UserError(f"--times must strictly decrease, not {' '.join(map(str, a.times))}")
    out = output_file(a.out, (".png",), "--out")  # before any work: a bad path costs nothing
    npz = output_file(a.npz, (".npz",), "--npz") if a.npz else None
    if npz is not None and npz.resolve() == out.resolve():
        raise UserError("--out and --npz name the same file")
    g = load_generator(a.ckpt, ema=not a.raw, device=a.device, verify=not a.ignore_checksum)
    labels = None
    if a.label is not None:
        if not g.spec.net.class_conditional:
            raise UserError("--label given but this model is unconditional")
        bad = [v for v in a.label if not 0 <= v < g.spec.data.num_classes]
        if bad:
            raise UserError(f"--label must be in [0, {g.spec.data.num_classes}), not {bad[0]}")
        labels = torch.tensor(a.label, dtype=torch.int64).repeat(a.n // len(a.label) + 1)[: a.n]
    check_guidance(g, a.guidance)
    check_sampler_t_mid(g, a.t_mid, a.times, steps=[a.steps])
    g.vae = load_decoder(g.spec, g.device, a.vae)  # before sampling: a bad folder costs nothing
    x = generate(g, a.n, steps=a.steps, times=a.times, solver=a.solver, seed=a.seed, batch=a.batch, labels=labels,
                 guidance=a.guidance, t_mid=a.t_mid)
    imgs = to_images(g, x)
    save_grid(imgs, out)
    if npz is not None:
        write_atomic(npz, lambda f: np.savez(f, samples=imgs.numpy(), x=x.numpy()))
    what = f"{len(a.times)} given times" if a.times else f"{a.steps} step(s)"
    if g.is_consistency and not a.times and a.steps > 1:
        what += f", t_mid {g.t_mid if a.t_mid is None else a.t_mid:g}"
    kind = "consistency" if g.is_consistency else f"PF-ODE {a.solver}" + (f", guidance {a.guidance:g}" if a.guidance != 1.0 else "")
    print(f"wrote {a.out} ({a.n} samples, {kind}, {what}{', ' + a.npz if a.npz else ''})")

