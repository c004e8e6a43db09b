"""ImageNet 512, EDM2-XXL: sCD of the diffusion teacher, on SD-VAE latents (shards/imagenet512-sdvae).

Needs the teacher's checkpoint runs/imagenet512_diffusion_xxl/ckpt.safetensors (train imagenet512_diffusion_xxl first).

Settings: specs/_imagenet.py (sCM Appendix G); `just train specs/imagenet512_scd_xxl.py --help` lists them.
"""

from _imagenet import imagenet_spec  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = imagenet_spec(512, "scd", "xxl")
