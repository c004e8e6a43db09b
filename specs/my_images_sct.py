"""sCT from scratch on your own images: the spec to copy (README, "Train on your own images").

1. Shard the folder (sub-folders are classes; `--no-labels` ignores them):
       python -m scm_graph.shard folder --src /data/flowers --resolution 64 --name my_images
2. Copy this file (specs/flowers_sct.py), then change:
   - `name` (the run goes to runs/<name>/) and `data.name` (the shard set, shards/<name>/);
   - `net.class_conditional=True` to condition on the sub-folder classes;
   - the network: `channel_mult` has one entry per resolution level (64 px: 4 levels down to 8 px),
     `attn_resolutions` the sides with self-attention; for 32 px images use (2, 2, 2) as CIFAR-10 does;
   - `train.batch`, `train.total_images` (images seen, not epochs), `train.ema_halflife_images` (about
     0.2-1% of total_images) and how often grids and checkpoints are written.
   Shape fields (resolution, channels, classes, per-channel statistics) come from the shard manifest.
3. Train with `just train specs/flowers_sct.py`; `--resume` continues after an interruption.

Settings otherwise follow the paper's CIFAR-10 sCT (sCM Appendix G): sigma_d 0.5, P_mean -1.0, P_std 1.4,
RAdam lr 1e-4 betas (0.9, 0.99), tangent normalisation c = 0.1, tangent warmup over 10k steps.
"""

from scm_graph.spec import DataSpec, NetSpec, ObjectiveSpec, OptimSpec, Spec, TrainSpec, UNetSpec

BATCH = 256

SPEC = Spec(
    name="my_images_sct",
    data=DataSpec(name="my_images", normalize="pixel", shuffle_buffer=10_000, workers=4),
    net=NetSpec(dropout=0.1, class_conditional=False,
                unet=UNetSpec(channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,), head_dim=64)),
    objective=ObjectiveSpec(kind="sct", sigma_d=0.5, P_mean=-1.0, P_std=1.4, tangent_c=0.1, warmup_images=10_000 * BATCH),
    optim=OptimSpec(kind="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8),
    train=TrainSpec(
        batch=BATCH,
        total_images=50_000_000,
        ema_halflife_images=250_000,
        log_every_images=100 * BATCH,
        sample_every_images=1_000_000,
        ckpt_every_images=1_000_000,
        keep_last=3,
    ),
)
