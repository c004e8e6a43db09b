"""sCT on the 8x8 digits with a DiT backbone (width 64, 4 blocks, 2x2 patches, heads of width 32).

Training settings are digits_sct's; the time embedding is as wide as the tokens (emb_mult 1, as in DiT).
"""

import dataclasses

from scm_graph.spec import DiTSpec, NetSpec

from digits_sct import SPEC as _SCT  # noqa: E402  (specs/ is on the path while a spec loads)

SPEC = dataclasses.replace(
    _SCT,
    name="digits_dit",
    net=NetSpec(arch="dit", dropout=_SCT.net.dropout,
                dit=DiTSpec(width=64, depth=4, patch_size=2, head_dim=32, mlp_ratio=4.0, emb_mult=1)),
)
