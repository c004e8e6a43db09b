"""The training loop: `train(spec, out, resume)`, driven by `python -m scm_graph.train` (scm_graph.train.cli).

Per step: a batch from the shards, noise and times drawn here (outside the compiled step), one
TrainStep, the EMA. Every few images, in this order: a JSONL metrics line, an atomic checkpoint, then
the optional work (a sample grid; the evaluation of `train.eval_metrics`, by default the digits FD of
1- and 2-step samples), so a failure in the optional work never loses trained state; the checkpoint
records what was still due and `--resume` finishes it. Evaluations go to metrics.jsonl and the metadata
of later checkpoints (`eval`); with `train.keep_best` the full state whose evaluation is the lowest so far
is also written as best.safetensors, its numbers in its metadata (`best`). Under torchrun every process
evaluates its share of the samples on the gathered EMA. The feature networks and reference statistics
are loaded on every process at the start, so a missing or unfitting file stops the run before it trains. A latent run's grids (and evaluations) are
decoded by its VAE (`data.vae`), which rank 0 loads once, before the run folder is touched: a missing
VAE stops the run at its start, not at its first grid.
`--resume` continues the run folder's checkpoint and reproduces the uninterrupted run exactly: the data
stream, noise generator, dropout keys, optimiser, fp16 loss scaler and EMA all continue from the saved
state. The run folder's layout and housekeeping live in `scm_graph.train.rundir`.

Non-finite values: samples with a non-finite tangent are masked by the objective and counted
(`nonfinite` in each metrics line, one console warning the first time); steps whose update was
skipped are counted (`skipped`). NONFINITE_PATIENCE consecutive steps without an update (every sample
masked, or a non-finite loss / gradient that is not an fp16 loss-scale overflow) stop the run with a
one-line error before anything more is written; the last checkpoint on disk stays as it is. The step's
report stays on the device; `scm_graph.train.watch` reads it every few steps, not every step (no host sync
per step on an accelerator), and at every step while updates are being skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from scm_graph import trigflow
from scm_graph.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from scm_graph.data.stream import Batch, batches
from scm_graph.data.vae import Vae
from scm_graph.errors import UserError
from scm_graph.eval import evaluator
from scm_graph.eval.evaluator import Metrics, is_digits, load_metrics
from scm_graph.eval.features import COLUMN, FeatureWeights, check_metrics
from scm_graph.model import (
    ZERO_INIT_EXTRAS,
    TrigFlowModel,
    build_model,
    copy_params,
    num_params,
)
from scm_graph.objectives import StepInputs
from scm_graph.objectives.discrete import snap_to_grid
from scm_graph.objectives.ict import draw_pair
from scm_graph.progress import Progress
from scm_graph.sample.generate import (
    Generator,
    decoder_folder,
    generate,
    load_decoder,
    to_images,
)
from scm_graph.sample.grid import save_grid
from scm_graph.spec import Spec, distils_guidance, spec_from_json, spec_to_json
from scm_graph.train import parallel
from scm_graph.train.distill import init_student, load_teacher, teacher_seconds
from scm_graph.train.ema import EMA, ema_beta
from scm_graph.train.meter import Meter
from scm_graph.train.parallel import World
from scm_graph.train.rundir import (
    BEST,
    CKPT,
    METRICS,
    keep_copy,
    prepare,
    read_records,
    truncate_metrics,
)
from scm_graph.train.step import TrainStep, Wrapped, learning_rate
from scm_graph.train.update import portable_state
from scm_graph.train.watch import NONFINITE_PATIENCE, Watch

# Fields a resumed run may change; everything else must match the checkpoint's spec.
RESUMABLE = {"train.total_images", "train.time_limit_s", "train.log_every_images", "train.sample_every_images", "train.grid_samples",
             "train.ckpt_every_images", "train.eval_every_images", "train.eval_samples", "train.eval_t_mid", "train.compile",
             "train.eval_metrics", "train.eval_ref", "train.eval_inception", "train.eval_dinov2", "train.keep_best",
             "train.device", "train.precision", "train.out", "train.keep_last", "train.progress", "train.progress_every_s",
             "data.workers", "data.root", "data.vae", "objective.fused_pass",
             "train.accum", "train.parallel", "train.dist_timeout_s"}  # the global batch stays; only its split changes


def draw_inputs(b: Batch, gen: torch.Generator, spec: Spec, step: int, images: int, device: torch.device,
                world: World | None = None) -> StepInputs:
    """All randomness of one step, drawn eagerly: z ~ N(0, sigma_d^2), tau ~ N(P_mean, P_std^2) (on the grid of
    objective.N for 'discrete'; for 'ict' the pair of grid times from the curriculum at this step instead).

    `b` is this process's share of the global batch. Every process draws the noise of the *whole* global
    batch from the same generator and keeps its own rows, so a sample's noise, time, label dropout and
    guidance scale do not depend on how the batch is split over processes (the cost: one global batch of
    noise per process and step).
    """
    o, world = spec.objective, world or World()
    x0 = b.x0.to(device, non_blocking=True)
    n = x0.shape[0]
    B = n * world.size  # the global batch
    mine = slice(world.rank * n, (world.rank + 1) * n)  # this process's rows of the global batch
    z = torch.randn((B, *x0.shape[1:]), generator=gen, device=device)[mine] * o.sigma_d
    t_prev = None
    if o.kind == "ict":  # the pair (sigma_i, sigma_{i+1}) on the curriculum's grid (iCT)
        total_steps = max(1, spec.train.total_images // spec.train.batch)
        t, t_prev = (x[mine] for x in draw_pair(gen, B, step, total_steps, o, o.sigma_d, device))
    else:
        tau = torch.randn(B, generator=gen, device=device)[mine] * o.P_std + o.P_mean
        t = trigflow.sample_t(tau, o.sigma_d)  # t = arctan(e^tau / sigma_d)
        if o.kind == "discrete":
            t = snap_to_grid(t, o, o.sigma_d)  # t_i = i t_max / N
    labels = b.label.to(device, non_blocking=True) if (b.label is not None and spec.net.class_conditional) else None
    if labels is not None and o.kind == "diffusion" and o.label_dropout > 0:  # CFG: some labels -> the null class (-1)
        drop = torch.rand(B, generator=gen, device=device)[mine] < o.label_dropout
        labels = torch.where(drop, torch.full_like(labels, -1), labels)
    # filled on the device, not copied there: torch.tensor(..., device=cuda) waits for the queue to drain
    key = torch.full((), (spec.train.seed << 32) + step, dtype=torch.int64, device=device)  # seed < 2^31: no overflow
    r = 1.0 if o.warmup_images <= 0 else min(1.0, images / o.warmup_images)  # tangent warmup ratio
    guidance = None
    if distils_guidance(spec):  # sCD of a CFG teacher: s ~ U[s_min, s_max] per sample (sCM Sec. 6)
        lo, hi = o.guidance
        guidance = lo + (hi - lo) * torch.rand(B, generator=gen, device=device)[mine]
    return StepInputs(x0, z, t, labels, key, torch.full((), r, dtype=torch.float32, device=device), guidance, t_prev)


def eval_metrics(spec: Spec) -> tuple[str, ...]:
    """The metrics each evaluation computes: train.eval_metrics, else the digits FD for the 8x8 digits."""
    return spec.train.eval_metrics or (("fd_digits",) if is_digits(spec) else ())


def eval_keys(spec: Spec) -> list[str]:
    """The metrics.jsonl keys an evaluation writes: fd_1step, fd_2step, fid_1step, ... (fd_heun32, ... for diffusion)."""
    tags = ["heun32"] if spec.objective.kind == "diffusion" else ["1step", "2step"]
    return [f"{COLUMN[m]}_{tag}" for m in eval_metrics(spec) for tag in tags]


def is_eval_key(key: str) -> bool:
    return key.startswith(tuple(f"{c}_" for c in COLUMN.values()))


def load_eval(spec: Spec, device: torch.device) -> Metrics | None:
    """The run's eval metrics (feature networks on `device`, references), loaded on every process before the
    run folder is touched, so that a missing or unfitting file is one line at the start (None: no evaluation)."""
    from scm_graph.eval.registry import check_weights

    t, metrics = spec.train, eval_metrics(spec)
    if t.keep_best and t.keep_best not in eval_keys(spec):
        keys = ", ".join(eval_keys(spec)) or "none: it evaluates nothing"
        raise UserError(f"train.keep_best {t.keep_best!r} is not an eval key of this run (its keys: {keys})")
    if not metrics:
        return None
    weights = FeatureWeights(t.eval_inception, t.eval_dinov2)
    check_metrics(metrics)
    if any(m != "fd_digits" for m in metrics) and not t.eval_ref:
        raise UserError(f"train.eval_metrics {' '.join(metrics)} need reference statistics: set train.eval_ref "
                        "(python -m scm_graph.eval ref --shards DIR --out FILE makes them)")
    check_weights(metrics, weights, ("--train.eval_inception", "--train.eval_dinov2"))
    with torch.random.fork_rng(devices=[]):  # building networks must not move the global RNG
        return load_metrics(spec, device, metrics, t.eval_ref, weights, ref_flag="train.eval_ref")


def evaluate_metrics(g: Generator, metrics: Metrics, n: int, seed: int = 0) -> dict[str, float]:
    """The eval metrics of 1- and 2-step samples (consistency; t_mid = train.eval_t_mid) or 32-step Heun
    (diffusion); under torchrun each process generates its share and every process gets the values."""
    if g.is_consistency:
        rows = evaluator.evaluate(g, [1, 2], n, seed=seed, metrics=metrics, t_mid=g.spec.train.eval_t_mid)
    else:
        rows = evaluator.evaluate(g, [32], n, solver="heun", seed=seed, metrics=metrics)
    return {k: v for r in rows for k, v in r.log_keys().items()}


class Run:
    """The state of one training run and the side effects around the step.

    Under torchrun (`world.launched`) every process holds a Run; rank 0 alone prints, logs and writes
    files, and every collective (gathering weights for a checkpoint or a grid) is entered by all of them.
    """

    def __init__(self, spec: Spec, out: Path, resume: bool, verify: bool = True, world: World | None = None,
                 device: torch.device | None = None, vae: Vae | None = None, metrics: Metrics | None = None):
        self.spec, self.out, self.world = spec, out, world or World()
        self.metrics = metrics  # the eval metrics' feature networks and references (load_eval; None: the run evaluates nothing)
        self.vae = vae  # latent runs: decodes the grids (rank 0; loaded at the first grid if not given)
        self.device = device if device is not None else parallel.join(spec.train.device, spec.train.dist_timeout_s)[1]
        t = spec.train
        torch.manual_seed(t.seed)
        self.model: TrigFlowModel = build_model(spec).to(self.device).train()
        self.teacher = load_teacher(spec, self.device, verify) if spec.objective.kind == "scd" else None
        self.verify = verify
        if not resume and t.init_from:
            self._init_from(t.init_from)
        elif not resume and self.teacher is not None and spec.objective.init_from_teacher:
            init_student(self.model, self.teacher, spec)  # sCD: the student starts as the teacher
        self.wrapped = self._wrap() if self.world.launched else None
        self.step_fn = TrainStep(self.model, spec, teacher=self.teacher.module if self.teacher else None, wrapped=self.wrapped)
        self.ema = EMA(self.model)  # sharded like the weights under FSDP2
        self.gen = torch.Generator(device=self.device).manual_seed(t.seed)  # the same on every process
        self.step = self.images = 0
        self.wall = 0.0
        self.saved_meta: dict = {}  # the resumed checkpoint's meta (what it had still to do, its last metrics)
        self.last_eval: dict = {}  # the newest evaluation ({"images": ..., key: value}), in every checkpoint's metadata
        self.saved_images = -1  # the count of the newest checkpoint on disk
        if resume:
            self._load(out / CKPT)

    def _wrap(self) -> Wrapped:
        """DDP or FSDP2 around the model, and the plain module the JVP pass runs on."""
        spec = self.spec
        if spec.train.parallel == "fsdp" and spec.train.precision == "fp16":
            raise UserError("train.precision fp16 is not supported with train.parallel fsdp (its loss scaler would "
                            "see only this process's shard of the gradients); use bf16")
        if spec.train.parallel == "fsdp":
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                plain = build_model(spec).train()  # structure only: weights and buffers come in through functional_call
        else:
            plain = self.model
        module = parallel.wrap(self.model, spec.train.parallel, self.world, self.device,
                               all_used=spec.objective.adaptive_weighting)
        return Wrapped(module, plain, self.world)

    # --- state in and out -------------------------------------------------------------------
    def _init_from(self, path: str) -> None:
        ckpt = load_checkpoint(path, verify=self.verify)
        scale = spec_from_json(ckpt.spec_json).net.time_scale
        if scale != self.spec.net.time_scale:  # same weights, another c_noise(t) = s t: not the network it was
            raise UserError(f"train.init_from {path} was trained with net.time_scale {scale:g}, this run has "
                            f"{self.spec.net.time_scale:g}: set net.time_scale {scale:g}")
        try:  # a guidance-distilled student may start from a teacher without the (zero-initialised) guidance input
            copy_params(self.model, ckpt.ema if ckpt.ema is not None else ckpt.net, allow_missing=ZERO_INIT_EXTRAS)
        except ValueError as e:
            raise UserError(f"train.init_from {path}: {e}") from None

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device, verify=self.verify)
        check_resumable(spec_from_json(ckpt.spec_json), self.spec, path)
        if self.world.launched:  # any number of processes: each keeps its own shard of the full tensors
            parallel.copy_full(dict(self.model.named_parameters()), ckpt.net)
            parallel.copy_full(self.ema.params, ckpt.ema)
            parallel.load_optimizer_state(self.model, self.step_fn.optimizer, portable_state(self.step_fn.optimizer, ckpt.optim))
        else:
            copy_params(self.model, ckpt.net)
            self.ema.load(ckpt.ema)
            self.step_fn.optimizer.load_state_dict(portable_state(self.step_fn.optimizer, ckpt.optim))
        if self.step_fn.scaler.is_enabled() and ckpt.scaler:  # fp16 resumed from fp16: the exact loss scale
            self.step_fn.scaler.load_state_dict(ckpt.scaler)
        self.gen.set_state(ckpt.rng["noise"])
        own = f"torch_cpu.rank{self.world.rank}"
        torch.set_rng_state(ckpt.rng[own] if own in ckpt.rng else ckpt.rng["torch_cpu"])
        self.step, self.images, self.wall = ckpt.step, ckpt.images, float(ckpt.meta.get("wall_s", 0.0))
        self.saved_meta, self.saved_images = ckpt.meta, ckpt.images
        self.last_eval = dict(ckpt.meta.get("eval", {}))
        if self.world.main:
            truncate_metrics(self.out / METRICS, self.images)

    def _finite(self) -> bool:
        """Whether every weight and EMA weight is finite, on every process."""
        weights = [*self.model.parameters(), *self.ema.params.values()]
        ok = torch.stack([torch.isfinite(parallel.shard(w)).all() for w in weights]).all().long()
        return bool(parallel.all_reduce(ok, "min", self.world))

    def save(self, extra: dict | None = None, name: str = CKPT) -> None:
        """An atomic checkpoint of the full state (as `name` in the run folder); under torchrun gathered onto
        rank 0, which writes it, and no process goes on before it is on disk."""
        if not self._finite():  # never a NaN checkpoint
            kept = f"the last checkpoint {self.out / CKPT} is kept" if (self.out / CKPT).exists() else "no checkpoint was written"
            raise UserError(f"the weights are not finite at step {self.step} (images {self.images}); {kept}")
        w = self.world
        rng = {"noise": self.gen.get_state(), "torch_cpu": torch.get_rng_state()}
        self.step_fn.update.settle()  # a skipped update's step counts taken back before they are read
        if w.launched:
            net = parallel.full_weights({k: v for k, v in self.model.named_parameters()}, w)
            ema = parallel.full_weights(self.ema.params, w)
            optim = parallel.full_optimizer_state(self.model, self.step_fn.optimizer, w)
            states = parallel.gather_objects(torch.get_rng_state(), w)
            rng.update({f"torch_cpu.rank{r}": s for r, s in enumerate(states or []) if r > 0})
        else:
            net, ema = {k: v.detach() for k, v in self.model.named_parameters()}, self.ema.params
            optim = self.step_fn.optimizer.state_dict()
        if w.main:
            ckpt = Checkpoint(
                spec_json=spec_to_json(self.spec),
                step=self.step,
                images=self.images,
                net=net,
                ema=ema,
                optim=optim,
                rng=rng,
                scaler=self.step_fn.scaler.state_dict() if self.step_fn.scaler.is_enabled() else None,
                meta={"objective": self.spec.objective.kind, "wall_s": self.wall, "eval": self.last_eval, **(extra or {})},
            )
            save_checkpoint(self.out / name, ckpt)
            if name == CKPT:
                keep_copy(self.out, self.images, self.spec.train.keep_last)
        parallel.barrier(w)  # every process knows the checkpoint is on disk
        if name == CKPT:
            self.saved_images = self.images

    def generator(self, ema: dict[str, torch.Tensor] | None = None) -> Generator:
        with torch.random.fork_rng(devices=[]):  # building a model must not move the global RNG
            model = build_model(self.spec).to(self.device).eval()
        copy_params(model, self.ema.params if ema is None else ema)
        return Generator(model, self.spec, self.device, self.vae)

    def log(self, rec: dict) -> None:
        if self.world.main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def grid_path(self) -> Path:
        return self.out / "grids" / f"grid-{self.images:012d}.png"

    def grid(self, ema: dict[str, torch.Tensor] | None = None) -> Path:
        g = self.generator(ema)
        steps = 2 if g.is_consistency else 18
        t = self.spec.train
        x = generate(g, t.grid_samples, steps=steps, seed=t.seed, t_mid=t.eval_t_mid)  # 2 steps: [t_max, train.eval_t_mid]
        images = to_images(g, x)  # latent runs: decoded by the VAE
        self.vae = g.vae  # loaded once
        save_grid(images, self.grid_path())
        return self.grid_path()

    def evaluate(self, ema: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The eval metrics of the EMA's samples (every process; not yet logged)."""
        g = self.generator(ema)
        values = evaluate_metrics(g, self.metrics, self.spec.train.eval_samples)
        self.vae = g.vae  # latent runs: the VAE that decoded the samples, loaded once
        return values

    def best_protocol(self) -> dict:
        """What makes two values of train.keep_best comparable: the key, the sample count, the reference and, for
        a 2-step key, t_mid."""
        t = self.spec.train
        protocol = {"key": t.keep_best, "samples": t.eval_samples, "ref": t.eval_ref}
        return {**protocol, "t_mid": t.eval_t_mid} if t.keep_best.endswith("_2step") else protocol

    def best_value(self) -> float:
        """train.keep_best's value in best.safetensors; inf when there is none, or it was measured another way,
        or at a count beyond this run's (rank 0)."""
        path = self.out / BEST
        if not path.is_file():
            return math.inf
        best = {"t_mid": trigflow.T_MID, **json.loads(read_metadata(path).get("meta", "{}")).get("best", {})}  # older: 1.1
        same = all(best.get(k) == v for k, v in self.best_protocol().items()) and best.get("images", math.inf) <= self.images
        return float(best["value"]) if same else math.inf

    def logged_eval(self) -> dict | None:
        """The evaluation metrics.jsonl holds at this count, if any (rank 0)."""
        done = [r for r in read_records(self.out / METRICS) if r.get("event") == "eval" and r["images"] == self.images]
        return {k: v for k, v in done[-1].items() if k != "event"} if done else None

    def optional_work(self, grid: bool, evaluate: bool, last: dict) -> None:
        """The grid and the evaluation due at this count, after the checkpoint that holds the trained state.

        Idempotent (a grid on disk or an eval in the log at this count is not redone), so a resumed run
        finishes what a killed one had still to do; the global RNG is left as the checkpoint saved it.
        Under torchrun rank 0 makes the grid, and every process evaluates its share of the samples on the
        gathered EMA. A new best (train.keep_best) is written before the eval is logged, so a run killed in
        between redoes both.
        """
        if not (grid or evaluate):
            return
        w = self.world
        ema = parallel.full_weights(self.ema.params, w, everywhere=evaluate) if w.launched else None
        values, improved = None, False
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            if w.main and grid and not self.grid_path().exists():
                with torch.random.fork_rng(devices=devices):
                    self.grid(ema)
            if evaluate:
                done = parallel.same_everywhere(self.logged_eval() if w.main else None, w)
                if done is not None:
                    self.last_eval = done
                    last.update({k: v for k, v in done.items() if is_eval_key(k)})
                else:
                    with torch.random.fork_rng(devices=devices):
                        values = self.evaluate(ema)
                    key = self.spec.train.keep_best
                    improved = bool(parallel.same_everywhere(bool(key) and w.main and values[key] < self.best_value(), w))
        except UserError as e:
            if self.saved_images == self.images:
                raise UserError(f"{e} (the trained state at {self.images} images is saved in {self.out / CKPT}; "
                                "--resume finishes this work)") from None
            raise
        if values is not None:
            self.last_eval = {"images": self.images, **values}
            last.update(values)
        if improved:
            key = self.spec.train.keep_best
            self.save({"last": last, "best": {**self.best_protocol(), "value": values[key], "images": self.images}}, name=BEST)
        if values is not None:
            self.log({"event": "eval", **self.last_eval})
        parallel.barrier(w)


def check_resumable(saved: Spec, now: Spec, path: Path) -> None:
    """Every field outside RESUMABLE must equal the checkpoint's (the unused architecture's section aside);
    one-line UserError naming the first that differs."""
    a, b = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(now))
    unused = [f"net.{arch}." for arch in ("unet", "dit", "edm2") if arch != now.net.arch]
    if now.objective.kind != "diffusion" or not now.net.class_conditional:
        unused.append("objective.label_dropout")  # read by class-conditional diffusion only
    for k, v in a.items():
        if v != b[k] and k not in RESUMABLE and not any(k.startswith(u) for u in unused):
            raise UserError(f"--resume: {k} differs from the checkpoint {path} ({v!r} vs {b[k]!r})")
    if now.objective.kind == "ict" and saved.train.total_images != now.train.total_images:  # iCT's N(k) spans the run
        raise UserError(f"--resume: iCT's curriculum is laid out over train.total_images; it cannot change from "
                        f"{saved.train.total_images} (checkpoint {path}) to {now.train.total_images}")


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    """{'net': {'unet': {'channels': 8}}} -> {'net.unet.channels': 8}; lists become tuples."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _every(images_before: int, images_after: int, every: int) -> bool:
    return every > 0 and images_after // every > images_before // every


def train(spec: Spec, out: Path, resume: bool = False, progress: bool = True, verify: bool = True) -> dict:
    """Run (or continue) training; returns the final summary record.

    At each count that is due: the metrics line, then the checkpoint, then the optional work (grid,
    evaluation), so nothing optional can lose trained state. `progress=False` silences the progress
    display (warnings still print); otherwise `train.progress` decides. `verify` checks checkpoint checksums.
    Started by torchrun, every process runs this with its share of each global batch (scm_graph.train.parallel).
    """
    t = spec.train
    world, device = parallel.join(t.device, t.dist_timeout_s)
    local_batch = parallel.check_batch(t.batch, t.accum, world) * t.accum  # this process's share of a step
    decoder_folder(spec, flag="--data.vae")  # every process: a missing VAE is one line from each, not a lost rank 0
    metrics = load_eval(spec, device)  # every process: missing or unfitting eval files stop the run before it trains
    vae = load_decoder(spec, device, flag="--data.vae") if world.main else None  # latent runs: grids decode through it
    if world.main:
        for note in prepare(out, resume):
            print(note, file=sys.stderr, flush=True)
    parallel.barrier(world)  # the run folder is ready
    run = Run(spec, out, resume, verify, world, device, vae, metrics)
    stream = batches(spec.data, spec.objective.sigma_d, local_batch, t.seed, start_images=run.images // world.size,
                     rank=world.rank, world_size=world.size)
    if not resume:
        run.log({"event": "start", "images": 0, "params": num_params(run.model), "device": str(run.device),
                 "processes": world.size, "spec": json.loads(spec_to_json(spec))})
    last = dict(run.saved_meta.get("last", {}))
    ended = [r for r in read_records(out / METRICS) if r.get("event") == "end" and r["images"] == run.images]
    if resume and parallel.same_everywhere(bool(ended), world) and run.images >= t.total_images:
        return ended[-1] if ended else {}  # this run had already finished
    due = run.saved_meta.get("due", {})
    run.optional_work(due.get("grid", False), due.get("eval", False), last)  # what a killed run had still to do
    meter = Meter(run.device, world)
    meter.load(run.saved_meta.get("meter"))  # the steps since the last metrics line, when the checkpoint fell between two
    rate_t0, rate_img0 = time.perf_counter(), run.images
    t_start, wall0 = time.perf_counter(), run.wall
    watch, warned = Watch(run.device), False  # non-finite: counted on the device; announced yet?
    mode = t.progress if progress and world.main else "off"
    with Progress(spec.name, t.total_images, run.images, mode, t.progress_every_s) as bar:
        while run.images < t.total_images:
            inp = draw_inputs(next(stream), run.gen, spec, run.step, run.images, run.device, world)
            out_step = run.step_fn(inp, first=world.rank * local_batch, images=run.images)
            watch.add(out_step)
            before, after = run.images, run.images + t.batch
            wall = wall0 + time.perf_counter() - t_start
            writes = (after >= t.total_images or _every(before, after, t.log_every_images)
                      or _every(before, after, t.ckpt_every_images))
            reading = watch.due() or writes  # the same on every process (the report is global)
            if world.size == 1:
                stop = t.time_limit_s > 0 and wall >= t.time_limit_s
            else:  # every process stops at the same step: agreed when the watch reads anyway (no extra sync)
                stop = t.time_limit_s > 0 and reading and bool(parallel.all_reduce(
                    torch.tensor(int(wall >= t.time_limit_s), device=run.device), "max", world))
            if reading or stop:  # raise before the EMA, the metrics or a checkpoint see this step
                seen = watch.read()
                if seen.nonfinite and not warned:
                    warned = True  # counted over every process; rank 0 says it
                    if world.main:
                        last, first = run.step + 1, run.step + 2 - seen.steps
                        steps = f"step {last}" if first == last else f"steps {first}-{last}"
                        bar.note(f"warning: {steps}: {seen.nonfinite} of {seen.steps * out_step.n_samples} samples "
                                 "had a non-finite tangent or prediction and were masked (loss weight 0); "
                                 "metrics.jsonl counts them under 'nonfinite'")
                if seen.stalled >= NONFINITE_PATIENCE:
                    why = ("every sample had a non-finite tangent or prediction" if seen.all_masked
                           else "the loss or gradient norm was not finite")
                    kept = f"the last checkpoint {out / CKPT} is kept" if (out / CKPT).exists() else "no checkpoint was written"
                    raise UserError(f"{why} for {seen.stalled} consecutive steps (up to step {run.step + 1}); "
                                    f"training stopped, {kept}")
            run.ema.update(run.model, ema_beta(t.batch, run.images + t.batch, t.ema_halflife_images, t.ema_rampup))
            meter.add(out_step, inp.t)
            run.images, run.step, run.wall = after, run.step + 1, wall
            done = run.images >= t.total_images or stop
            if _every(before, run.images, t.log_every_images) or done:
                rec = meter.flush()
                now = time.perf_counter()
                ips = (run.images - rate_img0) / max(now - rate_t0, 1e-9)
                rate_t0, rate_img0 = now, run.images
                r = float(inp.r)
                if run.teacher is not None and world.main:  # sCD: the teacher's share of the step time (timing, like img_per_s)
                    rec["teacher_share"] = round(min(1.0, teacher_seconds(run.teacher.module, inp, t.precision) * ips / t.batch), 3)
                lr = learning_rate(spec.optim, before)  # the last step's (optim.lr_rampup_images / lr_decay_images)
                last = {"images": run.images, "step": run.step, **rec, "r": r, "lr": lr, "img_per_s": round(ips, 1),
                        "wall_s": round(run.wall, 2)}
                run.log(last)
                bar.update(run.images, rate=ips, loss=math.nan if rec["loss"] is None else rec["loss"])
            else:
                bar.update(run.images)
            grid = _every(before, run.images, t.sample_every_images) or done
            evaluate = bool(eval_metrics(spec)) and (_every(before, run.images, t.eval_every_images) or done)
            if _every(before, run.images, t.ckpt_every_images) or done:
                run.save({"last": last, "due": {"grid": grid, "eval": evaluate}, "meter": meter.state()})  # the trained state first
            run.optional_work(grid, evaluate, last)
            if stop:
                break
    summary = {"event": "end", "images": run.images, "step": run.step, "wall_s": round(run.wall, 2),
               **{k: v for k, v in last.items() if is_eval_key(k) or k == "loss"}}
    run.log(summary)
    return summary
