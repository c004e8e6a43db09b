"""Evaluation: `python -m scm_graph.eval --ckpt run/ckpt.safetensors --steps 1 2`.

Digits checkpoints are scored by the Frechet distance in the feature space of a small digits
classifier (scm_graph.fd); `--floor` adds the FD of two halves of the real data. Consistency models
sample with 1, 2, ... steps; diffusion models with the PF-ODE solver (`--solver heun|euler`, N steps).
Inception FID (clean-fid) for CIFAR-10 and ImageNet comes in a later version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.sample import Generator, generate, load_generator, nfe, to_uint8


@dataclass
class EvalRow:
    sampler: str  # "consistency" or "heun" / "euler"
    steps: int
    nfe: int
    fd: float
    n: int
    seconds: float


def evaluate(g: Generator, steps: list[int], n: int = 1797, solver: str = "heun", seed: int = 0) -> list[EvalRow]:
    from scm_graph.fd import digits_fd

    if (g.spec.data.channels, g.spec.data.resolution) != (1, 8):
        raise UserError("FD is only defined for the 8x8 digits so far (Inception FID comes later)")
    rows = []
    for s in steps:
        t0 = time.perf_counter()
        x = generate(g, n, steps=s, solver=solver, seed=seed)
        fd = digits_fd(to_uint8(x, g.spec))
        sampler = "consistency" if g.is_consistency else solver
        rows.append(EvalRow(sampler, s, nfe(g, s, solver), fd, n, time.perf_counter() - t0))
    return rows


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.eval", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="sampling steps to evaluate")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="PF-ODE solver (diffusion checkpoints)")
    p.add_argument("--n", type=int, default=1797, help="samples per evaluation (default: the size of the real set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="store_true", help="also report FD(real half, other real half)")
    p.add_argument("--raw", action="store_true", help="evaluate the training weights instead of the EMA")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.n < 2:
        raise UserError("--n must be at least 2")
    g = load_generator(a.ckpt, ema=not a.raw, device=a.device)
    rows = evaluate(g, a.steps, a.n, a.solver, a.seed)
    floor = None
    if a.floor:
        from scm_graph.fd import digits_floor_fd

        floor = digits_floor_fd(a.seed)
    if a.json:
        for r in rows:
            print(json.dumps({"ckpt": a.ckpt, **asdict(r)}))
        if floor is not None:
            print(json.dumps({"ckpt": a.ckpt, "sampler": "real-halves", "fd": floor}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits FD  {a.ckpt}")
    for col in ("sampler", "steps", "NFE", "FD", "n", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.sampler, str(r.steps), str(r.nfe), f"{r.fd:.3f}", str(r.n), f"{r.seconds:.1f}")
    if floor is not None:
        table.add_row("real halves (floor)", "-", "-", f"{floor:.3f}", "898/899", "-")
    Console().print(table)


if __name__ == "__main__":
    main()
