"""sCM Fig. 5a, b at digits scale: each technique the paper credits, switched off one at a time against sCT.

digits_sct with the paper's settings (P_std 1.4, adaptive weighting on, pinned below) at 64k images, eager, seeds 0 and 1, the digits FD every 16k images. Variants: tangent
normalisation off (raw tangent) and clipped to [-1, 1] (Fig. 5a), adaptive weighting off (Fig. 5b), tangent
warmup off, and the time proposal moved (P_mean -0.4 / P_std 1.0). Stability: loss and grad-norm spikes,
non-finite samples and skipped steps in sweep.md. `just sweep specs/sweeps/fig5ab_digits.py`.
"""

from scm_graph.sweep import Sweep

PAPER = ["--objective.P_std", "1.4", "--objective.adaptive_weighting", "true"]  # the paper's settings (digits_sct's own differ)

SWEEP = Sweep(
    base="specs/digits_sct.py",
    images=64_000,
    seeds=(0, 1),
    args=["--train.compile", "false", "--train.eval_every_images", "16000", "--train.sample_every_images", "64000",
          "--train.ckpt_every_images", "64000", "--train.progress", "lines", *PAPER],
    variants={
        "sct": [],
        "raw_tangent": ["--objective.tangent_normalize", "false"],
        "clipped_tangent": ["--objective.tangent_clip", "true"],
        "no_adaptive_weighting": ["--objective.adaptive_weighting", "false"],
        "no_warmup": ["--objective.warmup_images", "0"],
        "P_mean-0.4": ["--objective.P_mean", "-0.4"],
        "P_std1.0": ["--objective.P_std", "1.0"],
    },
)
