"""`python -m tests.train.poison_runner RANKS FROM_STEP -- SPEC.py [overrides]`, run under torchrun by
tests/train/test_parallel.py: the training CLI with every sample of the processes in RANKS (comma-separated)
made non-finite (an inf in x0) from step FROM_STEP on, to check that the processes agree on what a
non-finite batch means (masked samples, skipped updates, the halt)."""

from __future__ import annotations

import os
import sys

from scm_graph.train import cli, loop


def main() -> None:
    ranks, from_step = {int(r) for r in sys.argv[1].split(",")}, int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    draw = loop.draw_inputs

    def poisoned(b, gen, spec, step, images, device, world=None):
        inp = draw(b, gen, spec, step, images, device, world)
        if rank in ranks and step >= from_step:
            inp.x0[:, 0, 0, 0] = float("inf")
        return inp

    loop.draw_inputs = poisoned
    cli.main(sys.argv[sys.argv.index("--") + 1:])


if __name__ == "__main__":
    main()
