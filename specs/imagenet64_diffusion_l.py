"""ImageNet 64, EDM2-L: the EDM2 diffusion teacher (TrigFlow), on pixels (shards/imagenet64).

Settings: specs/_imagenet.py (sCM Appendix G); `just train specs/imagenet64_diffusion_l.py --help` lists them.
"""

from _imagenet import imagenet_spec  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = imagenet_spec(64, "diffusion", "l")
