"""Example sweep: the time proposal's P_mean (sCM Sec. 4.2) for the digits sCT model, seeds 0 and 1, at half the
default run's budget (six runs of 128k images; the default 256k-image run trains in about 10 minutes on 2 CPU cores).
`just sweep specs/sweeps/example.py` writes runs/sweeps/example/sweep.md and its plots; the format: docs/sweep.md."""

from scm_graph.sweep import Sweep

SWEEP = Sweep(
    base="specs/digits_sct.py",
    images=128_000,
    seeds=(0, 1),
    variants={
        "P_mean-1.0": [],  # the spec's own value
        "P_mean-0.4": ["--objective.P_mean", "-0.4"],
        "P_mean-1.6": ["--objective.P_mean", "-1.6"],
    },
)
