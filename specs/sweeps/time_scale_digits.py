"""The time embedding's frequency scale at digits scale: c_noise = s t fed to the positional embedding.

sCM feeds t in [0, pi/2] with a highest frequency of 1 (s = 1), so half the embedding's channels change by
under 2% over the whole range; DDPM-style embeddings use s = 1000 (docs/design.md lists what other
implementations use). digits_sct at 64k images, eager, the same settings as specs/sweeps/fig5c_digits.py
(whose 'sct' variant is s = 1). `just sweep specs/sweeps/time_scale_digits.py`.
"""

from scm_graph.sweep import Sweep

PAPER = ["--objective.P_std", "1.4", "--objective.adaptive_weighting", "true"]  # the paper's settings (digits_sct's own differ)

SWEEP = Sweep(
    base="specs/digits_sct.py",
    images=64_000,
    seeds=(0,),
    args=["--train.compile", "false", "--train.eval_every_images", "16000", "--train.sample_every_images", "64000",
          "--train.ckpt_every_images", "64000", "--train.progress", "lines", *PAPER],
    variants={
        "s10": ["--net.time_scale", "10"],
        "s100": ["--net.time_scale", "100"],
        "s1000": ["--net.time_scale", "1000"],
    },
)
