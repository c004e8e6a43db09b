"""TrigFlow diffusion teacher on CIFAR-10 (sCM Appendix G): DDPM++ net, dropout 0.13, Adam 1e-3, 400k x 512.

The DDPM++ net has self-attention at 16x16 (and in the middle), heads of width 64.

Shards: python -m scm_graph.shard cifar10 --src cifar-10-python.tar.gz
"""

from scm_graph.spec import DataSpec, NetSpec, ObjectiveSpec, OptimSpec, Spec, TrainSpec, UNetSpec

SPEC = Spec(
    name="cifar10_diffusion",
    data=DataSpec(name="cifar10", normalize="pixel", shuffle_buffer=10_000, workers=4),
    net=NetSpec(dropout=0.13, unet=UNetSpec(channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), head_dim=64)),
    objective=ObjectiveSpec(kind="diffusion", sigma_d=0.5, P_mean=-1.0, P_std=1.4),
    optim=OptimSpec(kind="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
    train=TrainSpec(
        batch=512,
        total_images=400_000 * 512,
        ema_halflife_images=500_000,
        log_every_images=512 * 100,
        sample_every_images=5_120_000,
        ckpt_every_images=5_120_000,
    ),
)
