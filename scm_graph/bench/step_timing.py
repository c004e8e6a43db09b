"""Timing one train step: `time_step` runs a spec's step (any objective, eager or compiled, at a precision) on a
synthetic batch and reports images/s; `bench_spec` reads a spec with its data shape filled in without its shards.
Used by `bench.step` (one spec's table) and `bench.step_specs` (every spec's table)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from scm_graph.bench.common import synchronize
from scm_graph.errors import UserError
from scm_graph.model import build_model
from scm_graph.objectives import StepInputs
from scm_graph.spec import Spec, distils_guidance, validate
from scm_graph.specfile import read_spec_file
from scm_graph.train.step import TrainStep


@dataclass
class StepTiming:
    objective: str
    mode: str  # "eager" / "compiled"
    precision: str  # "fp32" / "bf16" / "fp16"
    images_per_s: float
    ms_per_step: float
    warmup_s: float  # first steps, including compilation
    fused_pass: str = "auto"  # objective.fused_pass of the consistency step
    host_read_ms: float | None = None  # ms per step with the update decided on the host (--host-read)

    @property
    def label(self) -> str:
        return self.objective if self.fused_pass == "auto" or self.objective == "diffusion" else f"{self.objective}, fused pass {self.fused_pass}"


def time_step(spec: Spec, kind: str, compile: bool, batch: int, steps: int, warmup: int, dev: torch.device, rounds: int = 3,
              precision: str = "fp32", fused_pass: str = "auto", host_read: bool = False) -> StepTiming:
    spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, kind=kind, fused_pass=fused_pass),
                               train=dataclasses.replace(spec.train, precision=precision))
    torch.manual_seed(0)
    model = build_model(spec).to(dev).train()
    teacher = None
    if kind == "scd":  # a frozen teacher of the same network (its weights do not matter for the timing)
        t_spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, kind="diffusion"))
        teacher = build_model(t_spec).to(dev).eval().requires_grad_(False)
    step = TrainStep(model, spec, compile=compile, teacher=teacher)
    d = spec.data
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (batch, d.channels, d.resolution, d.resolution)
    labels = torch.arange(batch, device=dev) % d.num_classes if spec.net.class_conditional else None
    t = torch.rand(batch, generator=g, device=dev) * 1.5 + 0.01
    inp = StepInputs(
        torch.randn(shape, generator=g, device=dev) * 0.5,
        torch.randn(shape, generator=g, device=dev) * 0.5,
        t,
        labels,
        torch.tensor(1, device=dev),
        torch.tensor(0.5, device=dev),
        1 + torch.rand(batch, generator=g, device=dev) if distils_guidance(spec) else None,  # sCD: the CFG scale s
        t * 0.9 if kind == "ict" else None,  # iCT: the earlier level of each pair
    )
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(inp)
    synchronize(dev)
    warm = time.perf_counter() - t0

    def best() -> float:
        dt = float("inf")
        for _ in range(rounds):  # best of several rounds: robust to a noisy machine
            t1 = time.perf_counter()
            for _ in range(steps):
                step(inp)
            synchronize(dev)
            dt = min(dt, (time.perf_counter() - t1) / steps)
        return dt

    dt = best()
    read_ms = None
    if host_read:  # the same step deciding its update on the host: it waits for the step's flags every step
        step.update.settle()  # nothing of the device path left pending
        step.device_skip = False
        read_ms = best() * 1e3
    return StepTiming(kind, "compiled" if compile else "eager", precision, batch / dt, dt * 1e3, warm, fused_pass, read_ms)


def bench_spec(path: str) -> Spec:
    """The spec at `path`, its data shape filled in from its data set's name where it has no shards to read it from."""
    spec = read_spec_file(path)
    d = spec.data
    if not d.resolution or not d.channels:  # shape from the spec's data set, without needing its shards
        shapes = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "imagenet64": (3, 64, 1000), "imagenet512-sdvae": (4, 64, 1000)}
        if d.name not in shapes:
            raise UserError(f"--spec {path}: set data.resolution and data.channels to benchmark without shards")
        c, r, k = shapes[d.name]
        d = dataclasses.replace(d, channels=c, resolution=r, num_classes=k)
    spec = dataclasses.replace(spec, data=d)
    validate(spec)
    return spec
