"""`python -m scm_graph.eval --ckpt run/ckpt.safetensors --steps 1 2 [--guidance S] [--floor] [--json]`: FD of a digits checkpoint.

`--floor` adds the FD of two halves of the real data, the best a sample set of that size can score.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from scm_graph.errors import ArgumentParser, UserError, cli_main
from scm_graph.eval.evaluator import evaluate
from scm_graph.sample.generate import check_guidance, is_latent, load_generator


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m scm_graph.eval", description="FD of a digits checkpoint's samples (1, 2, ... steps or a PF-ODE solver).")
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="sampling steps to evaluate")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="PF-ODE solver (diffusion checkpoints)")
    p.add_argument("--n", type=int, default=1797, help="samples per evaluation (default: the size of the real set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale s: a class-conditional diffusion model's guided PF-ODE, or a guidance-distilled sCD student's input (1 = none)")
    p.add_argument("--floor", action="store_true", help="also report FD(real half, other real half)")
    p.add_argument("--raw", action="store_true", help="evaluate the training weights instead of the EMA")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--device", default="auto")
    p.add_argument("--ignore-checksum", action="store_true", help="load a checkpoint whose data does not match its checksum")
    a = p.parse_args(argv)
    if a.n < 2:
        raise UserError(f"--n must be at least 2, not {a.n}")
    if any(s < 1 for s in a.steps):
        raise UserError(f"--steps must each be at least 1, not {' '.join(map(str, a.steps))}")
    g = load_generator(a.ckpt, ema=not a.raw, device=a.device, verify=not a.ignore_checksum)
    if is_latent(g.spec):
        raise UserError(f"{a.ckpt} is a latent model (VAE latents of {g.spec.data.name}); this FD scores digits "
                        "checkpoints only (use python -m scm_graph.sample for images)")
    check_guidance(g, a.guidance)
    rows = evaluate(g, a.steps, a.n, a.solver, a.seed, a.guidance)
    floor = None
    if a.floor:
        from scm_graph.eval.digits import digits_floor_fd

        floor = digits_floor_fd(a.seed)
    if a.json:
        for r in rows:
            print(json.dumps({"ckpt": a.ckpt, **asdict(r)}))
        if floor is not None:
            print(json.dumps({"ckpt": a.ckpt, "sampler": "real-halves", "fd": floor}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits FD  {a.ckpt}" + (f"  guidance {a.guidance:g}" if a.guidance != 1.0 else ""))
    for col in ("sampler", "steps", "NFE", "FD", "n", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.sampler, str(r.steps), str(r.nfe), f"{r.fd:.3f}", str(r.n), f"{r.seconds:.1f}")
    if floor is not None:
        table.add_row("real halves (floor)", "-", "-", f"{floor:.3f}", "898/899", "-")
    Console().print(table)

