"""A class-conditional TrigFlow diffusion teacher on the 8x8 digits, with label dropout for classifier-free
guidance: the teacher that `specs/digits_scd.py` distils.

    just train specs/digits_teacher.py
    python -m scm_graph.sample --ckpt runs/digits_teacher/ckpt.safetensors --steps 32 --label 3 --guidance 1.5 --out g.png
"""

import dataclasses

from scm_graph.spec import ObjectiveSpec

from digits_diffusion import SPEC as _DIFFUSION  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _DIFFUSION,
    name="digits_teacher",
    net=dataclasses.replace(_DIFFUSION.net, class_conditional=True),
    objective=dataclasses.replace(_DIFFUSION.objective, label_dropout=0.1),  # the null class 10% of the time
)
