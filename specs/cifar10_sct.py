"""sCT on CIFAR-10 with the paper's settings (sCM Appendix G).

sigma_d 0.5, P_mean -1.0, P_std 1.4, RAdam lr 1e-4 betas (0.9, 0.99) eps 1e-8, no lr schedule, batch 512,
dropout 0.20, tangent normalisation c = 0.1, tangent warmup H = 10k iterations, EMA half-life 0.5 Mimg,
DDPM++ network with positional time embedding and adaptive double normalisation. The paper initialises
sCT from a diffusion model: pass `--train.init_from runs/cifar10_diffusion/ckpt.safetensors`.
"""

from scm_graph.spec import DataSpec, NetSpec, ObjectiveSpec, OptimSpec, Spec, TrainSpec

SPEC = Spec(
    name="cifar10_sct",
    data=DataSpec(name="cifar10", normalize="pixel", shuffle_buffer=10_000, workers=4),
    net=NetSpec(channels=128, channel_mult=(2, 2, 2), num_blocks=4, dropout=0.20),
    objective=ObjectiveSpec(kind="sct", sigma_d=0.5, P_mean=-1.0, P_std=1.4, tangent_c=0.1, warmup_images=10_000 * 512),
    optim=OptimSpec(kind="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8),
    train=TrainSpec(
        batch=512,
        total_images=400_000 * 512,
        ema_halflife_images=500_000,
        log_every_images=512 * 100,
        sample_every_images=5_120_000,
        ckpt_every_images=5_120_000,
    ),
)
