"""Samples and real images streamed through feature networks into float64 moments, split over processes.

Generated sample i (of n) draws its noise from its own generator, seeded by (seed, i) (`generate`'s
`sample_ids`), and
class-conditional models get label i mod num_classes, so a sample does not depend on the batch size or on
how many processes draw. Samples are made `batch` at a time; under torchrun process r takes the batches
c = r, r + size, ..., so a split job featurises exactly the samples one process would, and the merged sums
differ only by float64 rounding. Latent models' samples are decoded by their VAE (`to_images`) before
featurising; nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scm_graph.eval.features import FeatureNet
from scm_graph.eval.moments import Moments
from scm_graph.progress import Progress
from scm_graph.sample.generate import Generator, generate, to_images


@dataclass(frozen=True)
class Split:
    """This process's share of the work: rank r of size processes."""

    rank: int = 0
    size: int = 1

    def share(self, n: int, batch: int) -> int:
        """How many of n items, taken `batch` at a time, this process gets (batches c = rank, rank + size, ...)."""
        return sum(min(batch, n - c * batch) for c in range(self.rank, (n + batch - 1) // batch, self.size))  # sum of its batch sizes

    @staticmethod
    def current() -> Split:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return Split(dist.get_rank(), dist.get_world_size())
        return Split()


@dataclass(frozen=True)
class SampleSpec:
    """What to generate: n samples at `steps` (consistency, t_mid between the first two) or an N-step PF-ODE
    `solver` (diffusion)."""

    n: int
    steps: int
    solver: str = "heun"
    seed: int = 0
    guidance: float = 1.0
    batch: int = 256
    t_mid: float | None = None
    """Consistency models' intermediate time of 2 or more steps; None = the checkpoint's (train.eval_t_mid)."""


def sample_images(g: Generator, s: SampleSpec, split: Split = Split()) -> Iterator[Tensor]:
    """uint8 images [b, C, H, W] of this process's batches (see the module docstring)."""
    batches = (s.n + s.batch - 1) // s.batch
    for c in range(split.rank, batches, split.size):
        start = c * s.batch
        b = min(s.batch, s.n - start)
        labels = torch.arange(start, start + b) % g.spec.data.num_classes if g.spec.net.class_conditional else None  # label(i) = i mod classes
        x = generate(g, b, steps=s.steps, solver=s.solver, seed=s.seed, batch=b, labels=labels, guidance=s.guidance,
                     sample_ids=torch.arange(start, start + b), t_mid=s.t_mid)
        yield to_images(g, x)


def featurize(images: Iterable[Tensor], nets: list[FeatureNet], total: int = 0, name: str = "features",
              progress: str = "off") -> dict[str, Moments]:
    """Every net's float64 moments of the streamed images (this process's share), with a progress display
    counting images (`total` is this process's share, for the bar)."""
    moments = {net.metric: Moments.empty(net.dim) for net in nets}
    with Progress(name, max(total, 1), mode=progress, unit="img") as bar:  # type: ignore[arg-type]
        done = 0
        for x in images:
            for net in nets:
                moments[net.metric].add(net(x))
            done += int(x.shape[0])
            bar.update(done)
    return moments


def real_images(pixels: Iterable[tuple[bytes, int]], shape: tuple[int, int, int], n: int, batch: int,
                split: Split = Split()) -> Iterator[Tensor]:
    """The first n of a stream of (uint8 CHW bytes, label) as uint8 batches [b, C, H, W]; process r keeps the
    images i with (i // batch) % size == r, so the processes' shares add up to the first n."""
    buf: list[np.ndarray] = []
    for i, (raw, _label) in enumerate(pixels):
        if i >= n:
            break
        if (i // batch) % split.size == split.rank:
            buf.append(np.frombuffer(raw, np.uint8).reshape(shape))
            if len(buf) == batch:
                yield torch.from_numpy(np.stack(buf))
                buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf))
