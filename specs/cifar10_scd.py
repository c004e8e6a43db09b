"""sCD on CIFAR-10 with the paper's settings (sCM Appendix G): distil `specs/cifar10_diffusion.py`.

sigma_d 0.5, P_mean -1.0, P_std 1.4, RAdam lr 1e-4 betas (0.9, 0.99) eps 1e-8, no lr schedule, batch 512,
dropout 0 (sCD), tangent normalisation c = 0.1, tangent warmup H = 10k iterations, EMA half-life 0.5 Mimg;
the student is the teacher's DDPM++ network, initialised from the teacher's EMA weights.

    just train specs/cifar10_diffusion.py   # the teacher (runs/cifar10_diffusion/)
    just train specs/cifar10_scd.py
"""

import dataclasses

from scm_graph.spec import ObjectiveSpec, OptimSpec

from cifar10_diffusion import SPEC as _TEACHER  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _TEACHER,
    name="cifar10_scd",
    net=dataclasses.replace(_TEACHER.net, dropout=0.0),
    objective=ObjectiveSpec(kind="scd", teacher="runs/cifar10_diffusion/ckpt.safetensors", sigma_d=0.5, P_mean=-1.0,
                            P_std=1.4, tangent_c=0.1, warmup_images=10_000 * 512),
    optim=OptimSpec(kind="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8),
)
