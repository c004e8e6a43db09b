"""sCM Fig. 5c at digits scale: continuous-time sCT against discrete-time sCM at N = 10 ... 1280 and iCT.

Every variant is digits_sct's network, data, optimiser and EMA at one image budget (64k images, a quarter
of the default run, so the fourteen runs fit an afternoon on 2 CPU cores), run eagerly, seeds 0 and 1;
the digits FD of 1- and 2-step samples (1797 samples) every 16k images. Discrete-time sCM changes only the
tangent (objective.kind discrete, objective.N); iCT is specs/digits_ict.py (its own objective, P_mean/P_std
and Adam betas). `just sweep specs/sweeps/fig5c_digits.py`; results: docs/paper_claims_digits.md.
"""

from scm_graph.sweep import Sweep

PAPER = ["--objective.P_std", "1.4", "--objective.adaptive_weighting", "true"]  # the paper's settings (digits_sct's own differ)

SWEEP = Sweep(
    base="specs/digits_sct.py",
    images=64_000,
    seeds=(0, 1),
    args=["--train.compile", "false", "--train.eval_every_images", "16000", "--train.sample_every_images", "64000",
          "--train.ckpt_every_images", "64000", "--train.progress", "lines"],
    variants={
        "sct": PAPER,
        "ict": ["specs/digits_ict.py"],
        **{f"discrete_N{n}": ["--objective.kind", "discrete", "--objective.N", str(n), *PAPER] for n in (10, 40, 160, 640, 1280)},
    },
)
