"""Network size presets: EDM2's U-Nets (sCM Table 2, after Karras et al. 2024) and DiT's transformers
(Peebles & Xie 2023), with the parameter counts the papers publish and ours. Data only (no torch).

Our counts differ from the published ones by the sCM changes. EDM2: the adaptive double norm has a scale and a
shift linear per block where EDM2 has one modulation linear (about +5%). DiT: two adaptive double norms per
block (4 width^2) where adaLN-Zero has one 6 width^2 modulation (about -11%). `tests/nets/test_sizes.py`
builds every preset on the meta device and checks both.
"""

from __future__ import annotations

from dataclasses import dataclass

from scm_graph.spec import DiTSpec, EDM2Spec


@dataclass(frozen=True)
class EDM2Size:
    """An EDM2 U-Net size: config G at `channels`, channel_mult 1 2 3 4, 3 blocks per level, attention at 16 and 8."""

    name: str
    channels: int
    paper_params: int
    """The published count (sCM Table 2 / EDM2 Table 2), for ImageNet 512 (4x64x64 latents) and ImageNet 64 alike."""
    params: int
    """Ours, class-conditional (1000 classes), for 4x64x64 latents."""
    params_pixels: int
    """Ours, class-conditional (1000 classes), for 3x64x64 pixels."""
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)

    def spec(self) -> EDM2Spec:
        """The `net.edm2` section of this size (other fields at EDM2's defaults; `dataclasses.replace` changes them)."""
        return EDM2Spec(channels=self.channels, channel_mult=self.channel_mult, num_blocks=self.num_blocks,
                        attn_resolutions=self.attn_resolutions)


@dataclass(frozen=True)
class DiTSize:
    """A DiT size (Peebles & Xie 2023, Table 1), patch 2."""

    name: str
    width: int
    depth: int
    heads: int
    paper_params: int
    """DiT's published count (ImageNet 256, 4x32x32 latents, adaLN-Zero)."""
    params: int
    """Ours (adaptive double norm), class-conditional (1000 classes), for 4x32x32 latents."""
    patch_size: int = 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def spec(self) -> DiTSpec:
        """The `net.dit` section of this size."""
        return DiTSpec(width=self.width, depth=self.depth, patch_size=self.patch_size, head_dim=self.head_dim)


EDM2_SIZES: dict[str, EDM2Size] = {s.name: s for s in (
    EDM2Size("S", 192, 280_000_000, 293_926_081, 293_922_625),
    EDM2Size("M", 256, 498_000_000, 522_187_009, 522_182_401),
    EDM2Size("L", 320, 778_000_000, 815_590_721, 815_584_961),
    EDM2Size("XL", 384, 1_100_000_000, 1_174_137_217, 1_174_130_305),
    EDM2Size("XXL", 448, 1_500_000_000, 1_597_826_497, 1_597_818_433),
)}

DIT_SIZES: dict[str, DiTSize] = {s.name: s for s in (
    DiTSize("S", 384, 12, 6, 33_000_000, 29_359_504),
    DiTSize("B", 768, 12, 12, 130_000_000, 116_521_744),
    DiTSize("L", 1024, 24, 16, 458_000_000, 408_228_880),
    DiTSize("XL", 1152, 28, 16, 675_000_000, 601_464_976),
)}
