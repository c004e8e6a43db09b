"""sCD on the 8x8 digits: distil the class-conditional teacher of `specs/digits_teacher.py` into a one- and
two-step student that takes the guidance scale s as an input (sCM Sec. 6; s ~ U[1, 2] in training).

    just train specs/digits_teacher.py      # the teacher first (runs/digits_teacher/)
    just train specs/digits_scd.py          # the student starts from the teacher's EMA weights
    python -m scm_graph.sample --ckpt runs/digits_scd/ckpt.safetensors --steps 2 --label 3 --guidance 1.5 --out g.png

As the paper's sCD: dropout 0, tangent normalisation c = 0.1 with a warmup, RAdam (0.9, 0.99), the
student initialised from the teacher (its network settings must be the teacher's).
"""

import dataclasses

from scm_graph.spec import ObjectiveSpec, OptimSpec

from digits_teacher import SPEC as _TEACHER  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _TEACHER,
    name="digits_scd",
    net=dataclasses.replace(_TEACHER.net, dropout=0.0),
    objective=ObjectiveSpec(kind="scd", teacher="runs/digits_teacher/ckpt.safetensors", guidance=(1.0, 2.0),
                            sigma_d=0.5, P_mean=-1.0, P_std=1.4, tangent_c=0.1, warmup_images=30_000),
    optim=OptimSpec(kind="radam", lr=2e-4, betas=(0.9, 0.99), eps=1e-8),
    # 2-step sampling re-noises to t_mid 0.3, not the paper's 1.1: on the digits, the students of two teacher /
    # student training seeds scored their best held-out FD at t_mid 0.2-0.3 of 0.2-1.1 (docs/scd_results.md,
    # "Against held-out digits"). Sampling and the in-training FD read it; the loss does not.
    train=dataclasses.replace(_TEACHER.train, eval_t_mid=0.3),
)
