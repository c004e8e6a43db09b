"""The metrics meter: step outputs summed on the device between two metrics lines, then one JSON record.

Under torchrun each process sums its own samples; `flush` (and `state`, for a checkpoint that falls
between two lines) reduces the sums over all processes, so the record is the global batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scm_graph.train import parallel
from scm_graph.train.parallel import World
from scm_graph.train.step import StepOut

T_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, math.pi / 2)  # per-t-bucket loss edges
_OPS = {"w_min": "min", "w_max": "max", "skipped": "max"}  # every other sum is summed over processes (skips are agreed)


@dataclass
class Meter:
    """Accumulates step outputs on the device; `flush` returns one JSON-able record.

    Masked (non-finite) samples are left out of the per-sample means and buckets, and loss and grad norm
    average over the steps that updated the weights (not the skipped ones); a mean over nothing is null.
    """

    device: torch.device
    world: World = field(default_factory=World)
    n: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inner_edges = torch.tensor(T_BUCKETS[1:-1], device=self.device)  # built once, not per step

    def add(self, out: StepOut, t: torch.Tensor) -> None:
        idx = torch.bucketize(t.float(), self.inner_edges).long()
        nb = len(T_BUCKETS) - 1
        ok = ~out.nonfinite
        okf = ok.float()
        mse = torch.where(ok, out.mse.float(), 0.0)
        skipped = torch.as_tensor(out.skipped, device=self.device)  # an applied step has a finite loss and gradient norm
        vals = {
            "loss": torch.where(skipped, 0.0, out.loss.float()),
            "grad_norm": torch.where(skipped, 0.0, out.grad_norm.float()),
            "skipped": skipped.long(),
            "mse": mse.sum(),
            "tangent_norm": torch.where(ok, out.tangent_norm.float(), 0.0).sum(),
            "n_samples_ok": okf.sum(),
            "nonfinite": out.nonfinite.sum(),
            "bucket_sum": torch.zeros(nb, device=t.device).scatter_add_(0, idx, mse),
            "bucket_n": torch.zeros(nb, device=t.device).scatter_add_(0, idx, okf),
        }
        for k, v in vals.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        w = out.w.float()
        w_lo, w_hi = torch.where(ok, w, math.inf).min(), torch.where(ok, w, -math.inf).max()
        self.sums["w_min"] = torch.minimum(self.sums["w_min"], w_lo) if "w_min" in self.sums else w_lo
        self.sums["w_max"] = torch.maximum(self.sums["w_max"], w_hi) if "w_max" in self.sums else w_hi
        self.n += 1

    def _reduced(self) -> dict[str, torch.Tensor]:
        """The sums over all processes (copies; collective under torchrun, where every process has the same keys).
        The loss sums each process's mean, so it is divided by the number of processes."""
        if not self.world.launched:
            return self.sums
        out = {}
        for k in sorted(self.sums):
            v = parallel.all_reduce(self.sums[k].clone(), _OPS.get(k, "sum"), self.world)
            out[k] = v / self.world.size if k in ("loss", "grad_norm") else v
        return out

    def state(self) -> dict:
        """The running sums as JSON with their dtypes (a checkpoint between two metrics lines carries them; exact).
        Collective under torchrun: the sums are over all processes (rank 0 carries them on resume)."""
        sums = dict(self._reduced())
        skipped = int(sums.pop("skipped", 0))
        return {"n": self.n, "skipped": skipped,
                "sums": {k: [str(v.dtype).removeprefix("torch."), v.cpu().flatten().tolist()] for k, v in sums.items()}}

    def load(self, state: dict | None) -> None:
        """Continue the sums of `state()` (none: start empty); under torchrun only rank 0 takes the sums."""
        if not state:
            return
        self.n = int(state["n"])
        if not self.world.main:
            return
        shapes = {"bucket_sum": (len(T_BUCKETS) - 1,), "bucket_n": (len(T_BUCKETS) - 1,)}
        self.sums = {k: torch.tensor(v, dtype=getattr(torch, dtype), device=self.device).reshape(shapes.get(k, ()))
                     for k, (dtype, v) in state["sums"].items()}
        if self.sums:  # the skip count is agreed by every process: rank 0 carries it
            self.sums["skipped"] = torch.tensor(int(state["skipped"]), device=self.device)
        if self.world.size > 1:  # its loss and grad norm sums stand for all processes
            for k in ("loss", "grad_norm"):
                if k in self.sums:
                    self.sums[k] = self.sums[k] * self.world.size

    def flush(self) -> dict:
        s = {k: v.cpu() for k, v in self._reduced().items()}
        skipped = int(s["skipped"])
        applied, n_ok = self.n - skipped, float(s["n_samples_ok"])

        def mean(key: str, count: float) -> float | None:
            return float(s[key]) / count if count > 0 else None

        rec = {"loss": mean("loss", applied), "grad_norm": mean("grad_norm", applied),
               "mse": mean("mse", n_ok), "tangent_norm": mean("tangent_norm", n_ok)}
        rec["w_min"], rec["w_max"] = (float(s["w_min"]), float(s["w_max"])) if n_ok > 0 else (None, None)
        cnt = s["bucket_n"].clamp(min=1)
        rec["mse_by_t"] = {f"{T_BUCKETS[i]:.1f}-{T_BUCKETS[i + 1]:.1f}": round(float(s["bucket_sum"][i] / cnt[i]), 6)
                           for i in range(len(cnt)) if s["bucket_n"][i] > 0}
        rec["nonfinite"], rec["skipped"] = int(s["nonfinite"]), skipped
        self.n, self.sums = 0, {}
        return rec
