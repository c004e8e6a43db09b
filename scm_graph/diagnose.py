"""`python -m scm_graph.diagnose --ckpt run/ckpt.safetensors [--times 32] [--n 256]`: the sCM paper's Fig. 4 for a checkpoint.

For a grid of times t in (0, pi/2) it forms the tangent of Algorithm 1 on a batch of the checkpoint's own
data, exactly as the training objective does (`objectives.sct`: the same JVP, the same formula, the same
normalisation and loss), and splits it into its three terms

    g = -cos^2 t (sigma_d F^- - dx_t/dt)  -  r cos t sin t x_t  -  r sigma_d dF,   dF = cos t sin t dF^-/dt
        '-------- velocity --------'       '---- x_t ----'       '--- dF ---'

(dF is the JVP's tangent, already carrying cos t sin t: the JVP rearrangement of Sec. 5.1). Per t it
reports, averaged over the batch, the RMS (||.|| / sqrt(D)) of each term, of g before and after
normalisation (g / (||g|| + c), or the clip to [-1, 1]), the mean ||g|| and ||g_normalised||, the
objective's loss at theta = theta^- (its residual F - F^- - g is then -g_normalised), the mse and w_phi(t).

The same x0 (the first batch of the checkpoint's shard stream), noise z and (sCD with guidance) CFG scales
serve every t, so the curves differ only through t. The network runs in eval mode (no dropout) and fp32.
sCD checkpoints take dx_t/dt from their teacher (`objective.teacher`, or --teacher), as the objective does;
sCT checkpoints the one-sample estimate cos t z - sin t x0. r is the checkpoint's tangent-warmup ratio
unless --r is given. Writes JSON (every number) and a PNG (log-scale norms over t; the loss and w_phi below).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.checkpoint import read_metadata
from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.objectives.common import StepInputs, finite_samples, zero_unless
from scm_graph.objectives.scd import scd_velocity
from scm_graph.objectives.sct import (
    ConsistencyPrep,
    consistency_finish,
    normalize_tangent,
    sct_velocity,
    tangent_jvp,
    tangent_of,
)
from scm_graph.objectives.weighting import w_of
from scm_graph.paths import output_file, write_atomic
from scm_graph.progress import Progress
from scm_graph.spec import ObjectiveSpec, Spec, distils_guidance

TERMS = ("velocity", "x_t", "dF")
"""The tangent's terms, in the order of Algorithm 1's formula (see the module docstring)."""
TERM_LABELS = {
    "velocity": "cos²t (σ_d F⁻ − dx_t/dt)",
    "x_t": "r cos t sin t x_t",
    "dF": "r σ_d cos t sin t dF⁻/dt",
    "g": "g (before normalisation)",
    "g_normalized": "g normalised",
}
GRIDS = ("uniform", "proposal")


def time_grid(k: int, grid: str, cfg: ObjectiveSpec) -> list[float]:
    """k times in (0, pi/2), increasing: midpoints of k equal cells of t ('uniform'), or the log-normal
    proposal's (k + 0.5) / K quantiles, t = arctan(exp(P_mean + P_std Phi^-1(q)) / sigma_d) ('proposal')."""
    qs = [(i + 0.5) / k for i in range(k)]
    if grid == "uniform":
        return [q * math.pi / 2 for q in qs]
    nd = NormalDist(cfg.P_mean, cfg.P_std)
    return [math.atan(math.exp(nd.inv_cdf(q)) / cfg.sigma_d) for q in qs]


@dataclasses.dataclass
class Tangent:
    """One batch at one time: the per-sample tensors of the tangent's terms and what the objective makes of them."""

    terms: dict[str, Tensor]  # "velocity", "x_t", "dF": [B, C, H, W], each signed as it enters g
    g: Tensor  # the objective's un-normalised tangent (masked samples zero)
    g_normalized: Tensor  # g / (||g|| + c), or clipped
    g_norm: Tensor  # [B] ||g||
    loss: Tensor  # [] the objective's loss on this batch (masked samples count as zeros)
    mse: Tensor  # [B]
    w: Tensor  # [B] w_phi(t)
    ok: Tensor  # [B] bool: not masked


def tangent_terms(model: nn.Module, params: dict[str, Tensor], inp: StepInputs, cfg: ObjectiveSpec,
                  dxt_of: Callable[[Tensor, StepInputs], Tensor]) -> Tangent:
    """`consistency_prepare` then `consistency_finish` at theta = theta^- (the objective's own functions: the
    masking, `tangent_jvp`, `tangent_of`, `normalize_tangent`, `w_of`, the loss), keeping the JVP's pieces
    to split g into its three terms."""
    ok = finite_samples(inp.x0, inp.z, inp.t)  # as consistency_prepare: non-finite data masked before both passes
    inp = StepInputs(zero_unless(ok, inp.x0), zero_unless(ok, inp.z), zero_unless(ok, inp.t), inp.labels, inp.dropout_key,
                     inp.r, inp.guidance)
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)  # x_t = cos t x0 + sin t z
    dxt = dxt_of(x_t, inp)  # dx_t/dt
    F_minus, dF = tangent_jvp(model, params, inp, x_t, dxt)
    g = tangent_of(F_minus, dF, x_t, dxt, inp.t, inp.r, model.sigma_d)  # the objective's g, exactly
    cos, sin = torch.cos(inp.t), torch.sin(inp.t)
    c2, cs, r = trigflow.expand(cos.square(), x_t), trigflow.expand(cos * sin, x_t), trigflow.expand(inp.r, x_t)
    terms = {"velocity": -c2 * (model.sigma_d * F_minus - dxt), "x_t": -r * (cs * x_t), "dF": -r * (model.sigma_d * dF)}
    ok = ok & finite_samples(F_minus, g)
    F_minus, g = zero_unless(ok, F_minus), zero_unless(ok, g)
    terms = {k: zero_unless(ok, v) for k, v in terms.items()}
    g_n, g_norm = normalize_tangent(g, cfg)
    F = functional_call(model, params, inp.forward_args(x_t))  # the gradient pass's F_theta(x_t / sigma_d, t)
    out = consistency_finish(F, w_of(model, params, inp.t, cfg), ConsistencyPrep(inp, x_t, F_minus, g_n, g_norm, ok))
    return Tangent(terms, g, g_n, g_norm, out.loss, out.mse, out.w, ~out.nonfinite)


def _rms(x: Tensor) -> Tensor:
    """[B] ||x_i|| / sqrt(D)."""
    return x.flatten(1).norm(dim=1) / math.sqrt(x[0].numel())


def _mean(x: Tensor, ok: Tensor) -> float | None:
    """Mean over the unmasked samples (None if every sample was masked)."""
    return float(x[ok].double().mean()) if ok.any() else None


def diagnose(model: nn.Module, cfg: ObjectiveSpec, x0: Tensor, z: Tensor, labels: Tensor | None, guidance: Tensor | None,
             times: list[float], r: float, dxt_of: Callable[[Tensor, StepInputs], Tensor], batch: int = 256,
             progress: Progress | None = None) -> dict[str, Any]:
    """Per time in `times`: the batch means of the terms' RMS, g's before and after normalisation, ||g||,
    the loss, mse, w_phi(t) and the masked count, over the samples x0 (noise z), `batch` samples at a time."""
    params = dict(model.named_parameters())
    n = x0.shape[0]
    keys = (*TERMS, "g", "g_normalized")
    res: dict[str, Any] = {"t": [], "rms": {k: [] for k in keys}, "norm": {"g": [], "g_normalized": []},
                           "loss": [], "mse": [], "w": [], "nonfinite": []}
    r_t = torch.tensor(r, dtype=torch.float32, device=x0.device)
    key = torch.tensor(0, dtype=torch.int64, device=x0.device)
    with torch.no_grad():  # no parameter gradient; forward-mode tangents are not affected
        for i, t in enumerate(times):
            per: dict[str, list[Tensor]] = {k: [] for k in (*keys, "norm_g", "norm_gn", "mse", "w", "ok")}
            loss = 0.0
            for s in range(0, n, batch):
                sl = slice(s, min(s + batch, n))
                b = sl.stop - sl.start
                tt = torch.full((b,), t, dtype=x0.dtype, device=x0.device)
                inp = StepInputs(x0[sl], z[sl], tt, None if labels is None else labels[sl], key, r_t,
                                 None if guidance is None else guidance[sl])
                out = tangent_terms(model, params, inp, cfg, dxt_of)
                for k in TERMS:
                    per[k].append(_rms(out.terms[k]))
                per["g"].append(_rms(out.g))
                per["g_normalized"].append(_rms(out.g_normalized))
                per["norm_g"].append(out.g_norm)
                per["norm_gn"].append(out.g_normalized.flatten(1).norm(dim=1))
                per["mse"].append(out.mse)
                per["w"].append(out.w)
                per["ok"].append(out.ok)
                loss += float(out.loss) * b / n  # the objective's batch mean, whole batch
            cat = {k: torch.cat(v) for k, v in per.items()}
            ok = cat["ok"]
            res["t"].append(float(t))
            for k in keys:
                res["rms"][k].append(_mean(cat[k], ok))
            res["norm"]["g"].append(_mean(cat["norm_g"], ok))
            res["norm"]["g_normalized"].append(_mean(cat["norm_gn"], ok))
            res["loss"].append(loss)
            res["mse"].append(_mean(cat["mse"], ok))
            res["w"].append(_mean(cat["w"], ok) if cfg.adaptive_weighting else None)
            res["nonfinite"].append(int((~ok).sum()))
            if progress is not None:
                progress.update(i + 1, loss=loss)
    if not cfg.adaptive_weighting:
        res["w"] = None
    return res


def figure(report: dict[str, Any]):
    """The plot of a report (only its numbers): log-scale RMS norms over t above, the loss and w_phi(t) below.
    A matplotlib Figure without pyplot (the Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nan = float("nan")
    clean = lambda ys: [nan if y is None else y for y in ys]  # masked everywhere: a gap
    t = report["t"]
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    styles = {"velocity": "-", "x_t": "-", "dF": "-", "g": "k-", "g_normalized": "k--"}
    for k, style in styles.items():
        top.plot(t, clean(report["rms"][k]), style, marker=".", label=TERM_LABELS[k])
    top.set_yscale("log")
    top.set_ylabel("RMS over the sample, batch mean")
    c = "clipped to [-1, 1]" if report["tangent_clip"] else f"g / (||g|| + {report['tangent_c']:g})"
    top.set_title(f"{report['name']}: step {report['step']}, {report['weights']} weights, r = {report['r']:.3g}, "
                  f"n = {report['n']}\ntangent terms of Algorithm 1; normalised: {c}", fontsize=10)
    top.legend(fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(t, clean(report["loss"]), "C3-", marker=".", label="loss e^w mse - w (θ = θ⁻)" if report["w"] else "loss (θ = θ⁻)")
    if report["w"] is not None:
        bottom.plot(t, clean(report["w"]), "C4--", marker=".", label="w_φ(t)")
    bottom.set_xlabel("t")
    bottom.set_xlim(0, math.pi / 2)
    bottom.legend(fontsize=8)
    bottom.grid(True, alpha=0.3)
    return fig


def write_png(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def warmup_ratio(spec: Spec, images: int) -> float:
    """The tangent-warmup ratio r the training loop used at `images` images."""
    w = spec.objective.warmup_images
    return 1.0 if w <= 0 else min(1.0, images / w)


def real_batch(spec: Spec, root: str | None, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """The first n samples of the checkpoint's shard stream (seed `seed`), in model units, and their labels."""
    from scm_graph.data.stream import batches

    data = dataclasses.replace(spec.data, root=root or spec.data.root, workers=0,
                               shuffle_buffer=min(spec.data.shuffle_buffer, 4 * n))
    b = next(batches(data, spec.objective.sigma_d, n, seed))
    labels = b.label if spec.net.class_conditional else None
    return b.x0, labels


def velocity_of(spec: Spec, device: torch.device, teacher: str | None, verify: bool) -> Callable[[Tensor, StepInputs], Tensor]:
    """dx_t/dt as the checkpoint's objective takes it: sCT's estimate, or the sCD teacher's (guided) velocity."""
    if spec.objective.kind != "scd":
        return sct_velocity
    from scm_graph.train.distill import load_teacher

    o = spec.objective
    if teacher:
        spec = dataclasses.replace(spec, objective=dataclasses.replace(o, teacher=teacher))
    where = "--teacher" if teacher else "objective.teacher"
    path = spec.objective.teacher
    if not path:
        raise UserError(f"this sCD checkpoint names no teacher ({where} is empty); pass --teacher PATH")
    if not Path(path).is_file():
        raise UserError(f"the teacher of this sCD checkpoint, {path} ({where}), is not a file; pass --teacher PATH")
    return functools.partial(scd_velocity, load_teacher(spec, device, verify).module)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.diagnose",
                       description="The tangent of a consistency checkpoint split into its terms over t (sCM Fig. 4): JSON and a PNG.")
    p.add_argument("--ckpt", required=True, help="an sCT or sCD checkpoint (.safetensors)")
    p.add_argument("--times", type=int, default=32, help="number of times t in (0, pi/2)")
    p.add_argument("--grid", choices=GRIDS, default="uniform",
                   help="'uniform': midpoints of equal cells of t; 'proposal': the log-normal time proposal's quantiles")
    p.add_argument("--n", type=int, default=256, help="real samples (the same ones at every t)")
    p.add_argument("--batch", type=int, default=256, help="samples per JVP pass")
    p.add_argument("--r", type=float, help="tangent-warmup ratio r in [0, 1] (default: the checkpoint's)")
    p.add_argument("--data-root", help="folder holding the checkpoint's shard set (default: its spec's data.root)")
    p.add_argument("--teacher", help="sCD: the teacher checkpoint (default: the spec's objective.teacher)")
    p.add_argument("--out", help="PNG to write (default: diagnose.png beside the checkpoint)")
    p.add_argument("--out-json", help="JSON to write (default: diagnose.json beside the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data stream, the noise and the CFG scales")
    p.add_argument("--raw", action="store_true", help="use the training weights instead of the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "off"], default="auto")
    p.add_argument("--ignore-checksum", action="store_true", help="load a checkpoint whose data does not match its checksum")
    a = p.parse_args(argv)
    for flag, v in (("--times", a.times), ("--n", a.n), ("--batch", a.batch)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, not {v}")
    if a.r is not None and not 0 <= a.r <= 1:
        raise UserError(f"--r must lie in [0, 1], not {a.r}")
    md = read_metadata(a.ckpt, verify=False)  # a missing or foreign file: one line, before any output is created
    run = Path(a.ckpt).parent
    out_png = output_file(a.out or run / "diagnose.png", (".png",), "--out")
    out_json = output_file(a.out_json or run / "diagnose.json", (".json",), "--out-json")

    from scm_graph.sample.generate import load_generator

    g = load_generator(a.ckpt, ema=not a.raw, device=a.device, verify=not a.ignore_checksum)
    spec, cfg = g.spec, g.spec.objective
    if cfg.kind not in ("sct", "scd", "discrete"):
        raise UserError(f"{a.ckpt} is a {cfg.kind!r} checkpoint; diagnose needs a TrigFlow consistency model (sct, scd or discrete)")
    dxt_of = velocity_of(spec, g.device, a.teacher, not a.ignore_checksum)
    x0, labels = real_batch(spec, a.data_root, a.n, a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    z = torch.randn(x0.shape, generator=gen) * cfg.sigma_d
    guidance = None
    if distils_guidance(spec):  # as the training loop: s ~ U[s_min, s_max] per sample
        lo, hi = cfg.guidance
        guidance = (lo + (hi - lo) * torch.rand(a.n, generator=gen)).to(g.device)
    images = int(md.get("images", 0))
    r = warmup_ratio(spec, images) if a.r is None else a.r
    times = time_grid(a.times, a.grid, cfg)
    with Progress("diagnose", len(times), mode=a.progress, unit="t") as prog:
        res = diagnose(g.model, cfg, x0.to(g.device), z.to(g.device), None if labels is None else labels.to(g.device),
                       guidance, times, r, dxt_of, a.batch, prog)
    report = {
        "ckpt": str(a.ckpt), "name": spec.name, "objective": cfg.kind, "weights": "raw" if a.raw else "ema",
        "step": int(md.get("step", 0)), "images": images, "r": r, "sigma_d": cfg.sigma_d, "tangent_c": cfg.tangent_c,
        "tangent_clip": cfg.tangent_clip, "adaptive_weighting": cfg.adaptive_weighting, "grid": a.grid, "n": a.n,
        "seed": a.seed, "dim": int(x0[0].numel()),
        "terms": {k: TERM_LABELS[k] for k in (*TERMS, "g", "g_normalized")},
        **res,
    }
    write_atomic(out_json, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    write_png(figure(report), out_png)
    print(f"wrote {out_json} and {out_png} ({len(times)} times, {a.n} samples, r = {r:.3g})")


if __name__ == "__main__":
    main()
