"""Scoring a generator: n samples per step count, streamed through feature networks, scored by the
Frechet distance of their float64 moments against reference statistics.

Consistency models sample with 1, 2, ... steps; diffusion models with the PF-ODE solver (`heun` /
`euler`, N steps). `fd_digits` uses the built-in real digits as its reference; `fid` and `fd_dinov2`
need reference statistics (`scm_graph.eval.refs`). Under torchrun the processes split the samples
(`scm_graph.eval.stream`) and every process returns the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from scm_graph.errors import UserError
from scm_graph.eval.features import COLUMN, FeatureNet, FeatureWeights, check_metrics
from scm_graph.eval.frechet import FeatureStats, frechet_distance
from scm_graph.eval.refs import load_refs
from scm_graph.eval.registry import feature_net
from scm_graph.eval.stream import SampleSpec, Split, featurize, sample_images
from scm_graph.sample.generate import Generator
from scm_graph.sample.samplers import nfe
from scm_graph.spec import Spec


@dataclass
class EvalRow:
    sampler: str  # "consistency" or "heun" / "euler"
    steps: int
    nfe: int
    values: dict[str, float]  # COLUMN[metric] -> value: "fd" (digits), "fid", "fd_dinov2"
    n: int
    seconds: float
    guidance: float = 1.0  # the CFG scale s the samples were drawn at
    t_mid: float | None = None  # consistency sampling's intermediate time (2 or more steps); None otherwise

    @property
    def fd(self) -> float:
        """The digits FD."""
        return self.values["fd"]

    def record(self) -> dict[str, object]:
        """One flat JSON record: sampler, steps, nfe, each metric's value, n, seconds, guidance, t_mid (null when unused)."""
        return {"sampler": self.sampler, "steps": self.steps, "nfe": self.nfe, **self.values, "n": self.n,
                "seconds": self.seconds, "guidance": self.guidance, "t_mid": self.t_mid}

    def log_keys(self) -> dict[str, float]:
        """The values under their metrics.jsonl keys: fd_2step, fid_1step, fd_dinov2_heun32, ..."""
        tag = f"{self.steps}step" if self.sampler == "consistency" else f"{self.sampler}{self.steps}"
        return {f"{col}_{tag}": v for col, v in self.values.items()}


@dataclass
class Metrics:
    """The feature networks and reference statistics of the metrics to compute (built once, reused)."""

    nets: list[FeatureNet]
    refs: dict[str, FeatureStats] = field(default_factory=dict)


def is_digits(spec: Spec) -> bool:
    """Whether the model makes the 8x8 grey digits (the fd_digits metric's data)."""
    return (spec.data.channels, spec.data.resolution) == (1, 8)


def load_metrics(spec: Spec, device: torch.device | str, metrics: list[str] | tuple[str, ...], ref: str = "",
                 weights: FeatureWeights | None = None, ref_flag: str = "--ref") -> Metrics:
    """The metrics' feature networks on `device` and their references: the file `ref` for fid and fd_dinov2, and
    for fd_digits where `ref` holds its statistics (a held-out split's, from `eval ref --metric fd_digits`), else all
    1797 real digits. Everything that can fail before sampling fails here, as one line: unknown or repeated metrics,
    fd_digits on other data, a missing or unfitting reference, weights that do not load."""
    check_metrics(metrics)
    if not metrics:
        raise UserError("no metric to compute")
    refs: dict[str, FeatureStats] = {}
    if "fd_digits" in metrics:
        if not is_digits(spec):
            d = spec.data
            raise UserError(f"fd_digits scores the 8x8 digits only; this model makes {d.channels}x{d.resolution}x"
                            f"{d.resolution} samples (use fid or fd_dinov2)")
        from scm_graph.eval.digits import real_digits_stats

        refs["fd_digits"] = real_digits_stats()
    need = [m for m in metrics if m != "fd_digits"]
    if need and not ref:
        raise UserError(f"{need[0]} needs reference statistics: pass {ref_flag} FILE (make one with python -m scm_graph.eval ref)")
    if ref:
        got = load_refs(ref, need, optional=("fd_digits",) if "fd_digits" in metrics else ())
        if not need and not got:
            raise UserError(f"{ref_flag} {ref} holds no fd_digits statistics (make them with python -m scm_graph.eval ref "
                            "--metric fd_digits --shards shards/digits-heldout)")
        refs.update(got)
    nets = [feature_net(m, weights, device) for m in metrics]
    for net in nets:  # before sampling: a mismatch would otherwise surface only after all n samples
        if refs[net.metric].mu.shape[0] != net.dim:
            raise UserError(f"the {net.metric} reference statistics hold {refs[net.metric].mu.shape[0]} features, but its "
                            f"feature network makes {net.dim} (made with another network?)")
    return Metrics(nets, refs)


def evaluate(g: Generator, steps: list[int], n: int = 1797, solver: str = "heun", seed: int = 0, guidance: float = 1.0,
             metrics: Metrics | None = None, batch: int = 256, progress: str = "off", split: Split | None = None,
             t_mid: float | None = None) -> list[EvalRow]:
    """One row per step count: every metric of `metrics` (default: the digits FD) of n samples. `split`: this
    process's share (default: the torchrun job's ranks, whose moments are then summed over the job). `t_mid`:
    consistency sampling's intermediate time (None: the checkpoint's train.eval_t_mid)."""
    if metrics is None:
        metrics = load_metrics(g.spec, g.device, ["fd_digits"])
    split = split or Split.current()
    t_mid = g.t_mid if t_mid is None else t_mid
    rows = []
    for s in steps:
        t0 = time.perf_counter()
        spec = SampleSpec(n, s, solver, seed, guidance, batch, t_mid)
        sampler = "consistency" if g.is_consistency else solver
        moments = featurize(sample_images(g, spec, split), metrics.nets, split.share(n, batch), f"{sampler} {s}", progress)
        merged = {m: mo.all_reduce() if split.size > 1 else mo for m, mo in moments.items()}
        values = {COLUMN[m]: frechet_distance(mo.stats(), metrics.refs[m]) for m, mo in merged.items()}
        uses_t_mid = g.is_consistency and s > 1
        rows.append(EvalRow(sampler, s, nfe(g.is_consistency, s, solver), values, n, time.perf_counter() - t0, guidance,
                            t_mid if uses_t_mid else None))
    return rows
