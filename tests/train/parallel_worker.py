"""Run by torchrun from tests/train/test_parallel.py (gloo, CPU, 2 processes): the wrapped train step against
one plain process, in float64.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.parallel_worker OUT.json [--compiled]

Every process builds the same tiny network, the same global batches (same images, noise, times, dropout key)
and a plain single-process reference (`World()`: no wrapper, the whole batch, accum 1), then trains its copy
under DDP and FSDP2 on its half of each batch (with accum 1 and 2) for 3 steps, for sCT, sCD and diffusion;
and sCT with RAdam, its second batch all non-finite, with the update decided on the device (as on an accelerator).
Rank 0 writes, per case, the largest differences of the losses and of the parameters after 3 steps and of
the JVP pass's F^- and tangent, all against the reference. `--compiled`: only the compiled sCT step under DDP.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from scm_graph.model import build_model
from scm_graph.objectives import StepInputs, get_passes
from scm_graph.spec import ObjectiveSpec, OptimSpec, Spec
from scm_graph.train import parallel
from scm_graph.train.loop import Run
from scm_graph.train.step import TrainStep, Wrapped
from tests.helpers import tiny_spec

STEPS, B = 3, 8


def case_spec(kind: str, accum: int, parallel_kind: str) -> Spec:
    spec = tiny_spec(dropout=0.2, class_conditional=True)  # dropout on: the keyed masks must follow the split
    obj = ObjectiveSpec(kind=kind, sigma_d=0.5, tangent_c=0.1, warmup_images=0, label_dropout=0.0,
                        teacher="teacher.safetensors" if kind == "scd" else "", guidance=(1.0, 2.0))
    return dataclasses.replace(spec, objective=obj, optim=OptimSpec(kind="adam", lr=1e-3),
                               train=dataclasses.replace(spec.train, batch=B, accum=accum, compile=False,
                                                         parallel=parallel_kind, device="cpu"))


def batches(spec: Spec, teacher_guidance: bool) -> list[StepInputs]:
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
        z = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
        t = torch.rand(B, generator=g, dtype=torch.float64) * 1.4 + 0.05
        labels = torch.randint(0, 10, (B,), generator=g)
        labels[0] = -1  # one null-class sample
        s = 1 + torch.rand(B, generator=g, dtype=torch.float64) if teacher_guidance else None
        out.append(StepInputs(x0, z, t, labels, torch.tensor(1000 + step), torch.tensor(1.0, dtype=torch.float64), s))
    return out


def rows(inp: StepInputs, lo: int, hi: int) -> StepInputs:
    return StepInputs(*(v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B else v
                        for v in (getattr(inp, f.name) for f in dataclasses.fields(inp))))


def fresh_model(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec).double().train()


def teacher_for(spec: Spec) -> torch.nn.Module | None:
    if spec.objective.kind != "scd":
        return None
    t_spec = dataclasses.replace(spec, objective=ObjectiveSpec(kind="diffusion", sigma_d=0.5))
    torch.manual_seed(5)
    teacher = build_model(t_spec).double().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reference(spec: Spec, data: list[StepInputs]) -> tuple[list[float], dict[str, torch.Tensor]]:
    one = dataclasses.replace(spec, train=dataclasses.replace(spec.train, accum=1))
    model = fresh_model(one)
    step = TrainStep(model, one, teacher=teacher_for(one))
    losses = [float(step(inp).loss) for inp in data]
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


def wrapped_run(spec: Spec, data: list[StepInputs], world: parallel.World,
                device_skip: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model(spec)
    run = Run.__new__(Run)  # only its wrapping: the real code path, without a run folder
    run.spec, run.world, run.model, run.device = spec, world, model, torch.device("cpu")
    wrapped = run._wrap()
    if spec.train.parallel == "fsdp":
        wrapped.plain.double()
    step = TrainStep(model, spec, teacher=teacher_for(spec), wrapped=wrapped, device_skip=device_skip)
    step.update.lag_counters = device_skip  # as on an accelerator: RAdam's step counts taken back after the fact
    n = B // world.size
    losses = []
    for inp in data:
        out = step(rows(inp, world.rank * n, (world.rank + 1) * n), first=world.rank * n)
        losses.append(float(parallel.all_reduce(out.loss.clone(), "sum", world)) / world.size)
    full = {k: parallel.local(v.detach()).clone() for k, v in model.named_parameters()}
    return losses, full


def jvp_check(spec: Spec, data: list[StepInputs], world: parallel.World) -> float:
    """The JVP pass (F^- and the tangent) on the wrapped model's gathered weights against the plain model's."""
    teacher = teacher_for(spec)
    passes = get_passes(spec.objective.kind, teacher)
    plain = fresh_model(spec)
    ref = passes.prepare(plain, {**dict(plain.named_parameters()), **dict(plain.named_buffers())}, data[0], spec.objective)
    model = fresh_model(spec)
    run = Run.__new__(Run)
    run.spec, run.world, run.model, run.device = spec, world, model, torch.device("cpu")
    w: Wrapped = run._wrap()
    if spec.train.parallel == "fsdp":
        w.plain.double()
    with torch.no_grad():
        got = passes.prepare(w.plain, parallel.full_params(model), data[0], spec.objective)
    if spec.objective.kind == "diffusion":
        return float((got.x_t - ref.x_t).abs().max())
    return max(float((got.F_minus - ref.F_minus).abs().max()), float((got.g - ref.g).abs().max()))


def ddp_bucket_storages(world: parallel.World) -> int:
    """How many storages DDP's gradients live in after a backward: 1 with `gradient_as_bucket_view` (the
    gradients are the reduction buckets, no second copy; docs/memory_edm2xl.md counts them so), one per
    weight otherwise."""
    spec = case_spec("diffusion", 1, "ddp")
    model = fresh_model(spec)
    ddp = parallel.wrap(model, "ddp", world, torch.device("cpu"))
    F, w = ddp(torch.randn(2, 1, 8, 8), torch.rand(2) + 0.1, torch.tensor([1, 2]), torch.tensor(3), None, weight=True)
    (F.square().mean() + w.mean()).backward()
    return len({p.grad.untyped_storage().data_ptr() for p in model.parameters()})


def compiled_cases(world: parallel.World) -> dict:
    """The compiled wrapped sCT step (`train.compile`, the default: under DDP the JVP pass and the gradient pass are
    compiled apart) against the plain eager process."""
    results = {}
    for pk in ("ddp",):
        spec = case_spec("sct", 1, pk)
        data = batches(spec, False)
        ref_losses, ref_params = reference(spec, data)
        losses, params = wrapped_run(dataclasses.replace(spec, train=dataclasses.replace(spec.train, compile=True)), data, world)
        results[f"sct/{pk}/compiled"] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "params": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
            "moved": max(float((ref_params[k] - fresh_model(spec).state_dict()[k]).abs().max()) for k in ref_params),
            "jvp": 0.0,
        }
    return results


def main() -> None:
    out_path = sys.argv[1]
    world, _ = parallel.join("cpu", 600 if "--compiled" in sys.argv else 120)
    torch.set_default_dtype(torch.float64)
    if "--compiled" in sys.argv:
        results = compiled_cases(world)
        if world.main:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
        torch.distributed.barrier()
        parallel.leave()
        return
    results = {}
    for kind in ("sct", "scd", "diffusion"):
        for pk in ("ddp", "fsdp"):
            for accum in (1, 2):
                spec = case_spec(kind, accum, pk)
                data = batches(spec, kind == "scd")
                ref_losses, ref_params = reference(spec, data)
                losses, params = wrapped_run(spec, data, world)
                results[f"{kind}/{pk}/accum{accum}"] = {
                    "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                    "params": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
                    "moved": max(float((ref_params[k] - fresh_model(spec).state_dict()[k]).abs().max()) for k in ref_params),
                    "jvp": jvp_check(spec, data, world),
                }
    for pk in ("ddp", "fsdp"):  # the accelerators' update, guarded on the device, with RAdam and a skipped step
        spec = case_spec("sct", 1, pk)
        spec = dataclasses.replace(spec, optim=OptimSpec(kind="radam", lr=1e-3))
        data = batches(spec, False)
        data[1].x0.fill_(float("nan"))  # every sample masked: the second update is skipped
        ref_losses, ref_params = reference(spec, data)
        losses, params = wrapped_run(spec, data, world, device_skip=True)
        results[f"sct/{pk}/device_skip"] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "params": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
            "moved": max(float((ref_params[k] - fresh_model(spec).state_dict()[k]).abs().max()) for k in ref_params),
            "jvp": 0.0,
        }
    results["ddp_bucket_storages"] = ddp_bucket_storages(world)
    if world.main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()  # both processes are done with every collective before the group goes
    parallel.leave()


if __name__ == "__main__":
    main()
