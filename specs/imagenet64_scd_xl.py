"""ImageNet 64, EDM2-XL: sCD of the diffusion teacher, on pixels (shards/imagenet64).

Needs the teacher's checkpoint runs/imagenet64_diffusion_xl/ckpt.safetensors (train imagenet64_diffusion_xl first).

Settings: specs/_imagenet.py (sCM Appendix G); `just train specs/imagenet64_scd_xl.py --help` lists them.
"""

from _imagenet import imagenet_spec  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = imagenet_spec(64, "scd", "xl")
