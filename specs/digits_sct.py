"""sCT from scratch on scikit-learn's 8x8 digits: the default run (README), minutes on 2 CPU cores.

The time proposal is narrower than the paper's (P_std 1.0, not 1.4) and adaptive weighting is off: at digits
scale these two gave the best 2-step FD against held-out digits, 4.63 +- 0.50 over three training seeds against
6.85 with the paper's settings (docs/paper_claims_digits.md, "The two-step gap against held-out digits").
"""

from scm_graph.spec import DataSpec, NetSpec, ObjectiveSpec, OptimSpec, Spec, TrainSpec, UNetSpec

SPEC = Spec(
    name="digits_sct",
    data=DataSpec(name="digits", normalize="channel", shuffle_buffer=1797),
    net=NetSpec(dropout=0.1, unet=UNetSpec(channels=32, channel_mult=(1, 2), num_blocks=2, norm_groups=8)),
    objective=ObjectiveSpec(kind="sct", sigma_d=0.5, P_mean=-1.0, P_std=1.0, tangent_c=0.1, warmup_images=30_000,
                            adaptive_weighting=False),
    optim=OptimSpec(kind="radam", lr=1e-3, betas=(0.9, 0.99), eps=1e-8),
    train=TrainSpec(
        batch=128,
        total_images=256_000,
        ema_halflife_images=20_000,
        ema_rampup=0.05,
        log_every_images=12_800,
        sample_every_images=64_000,
        ckpt_every_images=64_000,
        eval_every_images=64_000,
    ),
)
