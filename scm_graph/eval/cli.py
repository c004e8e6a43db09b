"""`python -m scm_graph.eval`: Frechet metrics of a checkpoint's samples, and reference statistics.

    python -m scm_graph.eval --ckpt run/ckpt.safetensors --steps 1 2 [--t-mid 1.1]        # digits: fd_digits
    python -m scm_graph.eval --ckpt X --steps 1 2 --metric fid fd_dinov2 --ref refs/cifar10.npz [--n 50000]
    python -m scm_graph.eval ref --shards shards/cifar10 --out refs/cifar10.npz [--metric fid fd_dinov2]
    python -m scm_graph.eval ref --shards shards/digits-heldout --out refs/digits-heldout.npz --metric fd_digits
    python -m scm_graph.eval --ckpt X --ref refs/digits-heldout.npz           # fd_digits against the held-out digits

Launched by torchrun, the processes split the samples (or real images) and rank 0 prints.
`--floor` (digits) adds the FD of two halves of the real data, the best a sample set of that size can score.
"""

from __future__ import annotations

import json
from pathlib import Path

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.eval.evaluator import evaluate, is_digits, load_metrics
from scm_graph.eval.features import METRICS, FeatureWeights
from scm_graph.eval.refs import save_refs
from scm_graph.eval.registry import check_weights, feature_net
from scm_graph.eval.stream import Split, featurize, real_images
from scm_graph.paths import output_file
from scm_graph.sample.generate import (
    check_guidance,
    check_sampler_t_mid,
    load_decoder,
    load_generator,
)
from scm_graph.train import parallel

FULL_N = 50_000  # the papers' sample count for FID and FD_DINOv2


def _weights_args(p: ArgumentParser) -> None:
    p.add_argument("--inception", default="", help="folder holding clean-fid's inception-2015-12-05.pt (default: clean-fid's /tmp)")
    p.add_argument("--dinov2", default="", help="a local clone of facebookresearch/dinov2 holding dinov2_vitl14_pretrain.pth")
    p.add_argument("--batch", type=int, default=256, help="samples generated and featurised at a time")
    p.add_argument("--device", default="auto")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, not {v}")


@cli_main
def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ref"]:
        return ref_main(argv[1:])
    p = ArgumentParser(prog="python -m scm_graph.eval",
                       description="Frechet metrics (fd_digits, fid, fd_dinov2) of a checkpoint's samples at 1, 2, ... steps "
                                   "or a PF-ODE solver. `python -m scm_graph.eval ref --help`: reference statistics.")
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="sampling steps to evaluate")
    p.add_argument("--metric", nargs="+", choices=METRICS, default=None,
                   help="metrics (default: fd_digits for a digits model; fid / fd_dinov2 need --ref)")
    p.add_argument("--ref", default="", help="reference statistics (.npz: ours from `eval ref`, or clean-fid's for fid)")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="PF-ODE solver (diffusion checkpoints)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help=f"samples per evaluation (default: 1797 for the digits, {FULL_N} otherwise; under torchrun spell it --num-samples)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise is seeded by (seed, i)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale s: a class-conditional diffusion model's guided PF-ODE, or a guidance-distilled sCD student's input (1 = none)")
    p.add_argument("--t-mid", type=float, default=None,
                   help="consistency models: the intermediate time of 2 (or more) steps, in (0, t_max) "
                        "(default: the checkpoint's train.eval_t_mid, 1.1 for older checkpoints)")
    p.add_argument("--floor", action="store_true", help="digits: also report FD(real half, other real half)")
    p.add_argument("--raw", action="store_true", help="evaluate the training weights instead of the EMA")
    p.add_argument("--vae", default="", help="latent models: the VAE folder that decodes samples (default: the one recorded)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--ignore-checksum", action="store_true", help="load a checkpoint whose data does not match its checksum")
    _weights_args(p)
    a = p.parse_args(argv)
    if a.n is not None and a.n < 2:
        raise UserError(f"--n must be at least 2, not {a.n}")
    if not 0 <= a.seed < 2**31:
        raise UserError(f"--seed must be in [0, 2^31), not {a.seed}")
    if any(s < 1 for s in a.steps):
        raise UserError(f"--steps must each be at least 1, not {' '.join(map(str, a.steps))}")
    _check_positive(batch=a.batch)
    weights = FeatureWeights(a.inception, a.dinov2)
    world, device = parallel.join(a.device, 600.0)
    try:
        g = load_generator(a.ckpt, ema=not a.raw, device=str(device), verify=not a.ignore_checksum)
        metrics = a.metric or (["fd_digits"] if is_digits(g.spec) else [])
        if not metrics:
            raise UserError(f"{a.ckpt} is not a digits model: pass --metric fid and/or fd_dinov2 with --ref FILE")
        if a.floor and "fd_digits" not in metrics:
            raise UserError("--floor is the digits FD's floor; add --metric fd_digits")
        check_guidance(g, a.guidance)
        check_sampler_t_mid(g, a.t_mid, steps=list(a.steps))
        check_weights(metrics, weights)
        loaded = load_metrics(g.spec, device, metrics, a.ref, weights)
        g.vae = load_decoder(g.spec, device, a.vae or None)  # latent models: decode before featurising
        n = a.n or (1797 if is_digits(g.spec) else FULL_N)
        rows = evaluate(g, a.steps, n, a.solver, a.seed, a.guidance, loaded, a.batch,
                        "auto" if world.main and not a.json else "off", t_mid=a.t_mid)
    finally:
        parallel.leave()
    if not world.main:
        return
    floor = None
    if a.floor:
        from scm_graph.eval.digits import digits_floor_fd

        floor = digits_floor_fd(a.seed)
    if a.json:
        for r in rows:
            print(json.dumps({"ckpt": a.ckpt, **r.record()}))
        if floor is not None:
            print(json.dumps({"ckpt": a.ckpt, "sampler": "real-halves", "fd": floor}))
        return
    from rich.console import Console
    from rich.table import Table

    cols = list(rows[0].values) if rows else []
    labels = {"fd": "digits FD", "fid": "FID", "fd_dinov2": "FD_DINOv2"}
    t_mid = next((r.t_mid for r in rows if r.t_mid is not None), None)  # one value: every 2+ step row shares it
    table = Table(title=f"{' / '.join(labels[c] for c in cols)}  {a.ckpt}" + (f"  guidance {a.guidance:g}" if a.guidance != 1.0 else "")
                  + (f"  t_mid {t_mid:g}" if t_mid is not None else ""))
    for col in ("sampler", "steps", "NFE", *(labels[c] for c in cols), "n", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.sampler, str(r.steps), str(r.nfe), *(f"{r.values[c]:.3f}" for c in cols), str(r.n), f"{r.seconds:.1f}")
    if floor is not None:
        table.add_row("real halves (floor)", "-", "-", *(f"{floor:.3f}" if c == "fd" else "-" for c in cols), "898/899", "-")
    Console().print(table)


def ref_main(argv: list[str]) -> None:
    p = ArgumentParser(prog="python -m scm_graph.eval ref",
                       description="Reference statistics (float64 feature moments) of a pixel shard set, for --ref.")
    p.add_argument("--shards", required=True, help="a pixel shard set folder (shards/cifar10)")
    p.add_argument("--out", required=True, help="the .npz to write (an existing file is kept unless --force)")
    p.add_argument("--metric", nargs="+", choices=list(METRICS), default=["fid"],
                   help="fid, fd_dinov2, or fd_digits (the digits' held-out split: --shards shards/digits-heldout)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None, help="use the first N images (default: all; under torchrun spell it --num-samples)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _weights_args(p)
    a = p.parse_args(argv)
    _check_positive(batch=a.batch)
    if a.n is not None and a.n < 2:
        raise UserError(f"--n must be at least 2, not {a.n}")
    out = output_file(a.out, (".npz",), "--out")
    if out.exists() and not a.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    weights = FeatureWeights(a.inception, a.dinov2)
    check_weights(a.metric, weights)
    from scm_graph.data.manifest import Manifest
    from scm_graph.data.stream import read_all
    from scm_graph.spec import DataSpec

    folder = Path(a.shards)
    m = Manifest.load(folder)
    if m.latent is not None:
        raise UserError(f"{folder} holds VAE latents; compute references from a pixel shard set of the same images "
                        "(shard them again without --vae)")
    shape = tuple(m.shape)
    if "fd_digits" in a.metric and shape != (1, 8, 8):
        raise UserError(f"fd_digits scores the 8x8 digits only; {folder} holds {'x'.join(map(str, shape))} images")
    n = min(a.n or m.count, m.count)
    world, device = parallel.join(a.device, 600.0)
    try:
        split = Split.current()
        nets = [feature_net(metric, weights, device) for metric in a.metric]
        images = real_images(read_all(DataSpec(name=folder.name, root=str(folder.parent))), shape, n, a.batch, split)
        moments = featurize(images, nets, split.share(n, a.batch), f"ref {folder.name}", "auto" if world.main else "off")
        stats = {metric: mo.all_reduce().stats() for metric, mo in moments.items()}
    finally:
        parallel.leave()
    if world.main:
        save_refs(out, stats, f"{folder.resolve()} (first {n} of {m.count} images)")
        print(f"wrote {out}: {', '.join(stats)} of {n} images of {folder}")
