"""ImageNet 64, EDM2-M: the EDM2 diffusion teacher (TrigFlow), on pixels (shards/imagenet64).

Settings: specs/_imagenet.py (sCM Appendix G); `just train specs/imagenet64_diffusion_m.py --help` lists them.
"""

from _imagenet import imagenet_spec  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = imagenet_spec(64, "diffusion", "m")
