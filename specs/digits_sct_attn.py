"""digits_sct with self-attention in the U-Net at 8x8 and 4x4 (and in the middle), heads of width 32."""

import dataclasses

from digits_sct import SPEC as _SCT  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _SCT,
    name="digits_sct_attn",
    net=dataclasses.replace(_SCT.net, unet=dataclasses.replace(_SCT.net.unet, attn_resolutions=(8, 4), head_dim=32)),
)
