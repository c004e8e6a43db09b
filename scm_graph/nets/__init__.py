"""Backbones computing F(x, c_noise, cond) only: the DDPM++-style U-Net, EDM2's U-Net and the DiT, and their parts.

`embedding` (time / class / CFG-scale embedding) and `norm` (adaptive double normalisation) are shared
by them; `sizes` holds the EDM2 and DiT size presets; `attention` is the U-Net's self-attention block; `dropout` the keyed dropout both use. The
TrigFlow wrapper (sigma_d, input scaling, c_noise) is `scm_graph.model`.
"""
