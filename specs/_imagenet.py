"""The ImageNet specs' one table (sCM Appendix G on top of EDM2 config G): `imagenet_spec(64 | 512, kind, size)`.

Every `specs/imagenet{64,512}_{kind}_{size}.py` is two lines that call `imagenet_spec`; this file is the only
place their settings live. It is not a spec itself (no SPEC). `python specs/_imagenet.py` rewrites those
files from the table (tests/test_imagenet_specs.py checks they match it).

What the papers state, and what we chose where they are silent (docs/imagenet.md says the same):
- All: batch 2048, Adam betas (0.9, 0.99), eps 1e-11 (sCM: EDM2 config G, Adam eps 1e-11), sigma_d 0.5,
  class-conditional (1000 classes), no flips; EDM2's learning-rate schedule (linear rampup over 10M images, then
  lr / sqrt(max(t / t_ref, 1)) with t_ref = 35k steps at 64, 70k steps at 512).
- Teacher lr per size (S, M, L, XL, XXL): 1e-2, 9e-3, 8e-3, 7e-3, 6.5e-3 (EDM2); consistency lr = teacher lr x 0.01.
- Time proposal: teachers at 64 P_mean -0.8, P_std 1.6 (EDM2 img64), at 512 -0.4, 1.0 (EDM2 img512);
  consistency models at 64 -1.0, 1.6 (sCM). At 512 sCM's value is not in our notes: we use -0.8, 1.6.
- Dropout: teachers as EDM2 (S 0, M and up 0.10); sCT at 64: 0.45 in the blocks at resolutions <= 16;
  sCD: the teacher's dropout (our choice; sCD on CIFAR-10 uses 0).
- Precision: fp16 at 64 (sCM, with the JVP flash attention); bf16 at 512 (our choice: fp16 is refused with
  FSDP2, which the XL and XXL students want).
- EMA: EDM2 keeps a power-function EMA (sigma_rel 0.05); we approximate it with a half-life of 8% of the
  images seen (train.ema_rampup 0.08; the half-life cap is the run's length, so the ramp always binds),
  which is the half-life of that power profile.
- Guidance: at 512 the teacher learns the unconditional velocity by label dropout 0.1 (EDM2 guides with a
  separate small network; ours is one network), and sCD distils s ~ U[1, 2] (sCM Sec. 6). At 64 no guidance
  (the paper's ImageNet 64 numbers are unguided): s is fixed at 1.
- sCT and sCD start from the teacher's EMA weights (sCM Algorithm 1: diffusion finetuning).
- Lengths: teachers as EDM2 (Mimg per size); consistency runs 100k steps (204.8 Mimg; our choice, the paper's
  per-size counts are not in our notes). Tangent warmup 10k steps (sCM).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scm_graph.nets.sizes import EDM2_SIZES
from scm_graph.spec import DataSpec, NetSpec, ObjectiveSpec, OptimSpec, Spec, TrainSpec

BATCH = 2048
MIMG = 1 << 20
TEACHER_LR = {"s": 1e-2, "m": 9e-3, "l": 8e-3, "xl": 7e-3, "xxl": 6.5e-3}  # EDM2 / sCM Appendix G
TEACHER_DROPOUT = {"s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1}  # EDM2
TEACHER_MIMG = {  # EDM2 training lengths in Mimg (2^20 images)
    64: {"s": 1024, "m": 2048, "l": 1024, "xl": 640},
    512: {"s": 2048, "m": 2048, "l": 1792, "xl": 1280, "xxl": 896},
}
DECAY_STEPS = {64: 35_000, 512: 70_000}  # EDM2 t_ref in steps
SIZES = {64: ("s", "m", "l", "xl"), 512: ("s", "m", "l", "xl", "xxl")}
KINDS = {64: ("diffusion", "sct", "scd"), 512: ("diffusion", "scd")}
LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)  # sCM Appendix G: SD-VAE latent statistics per channel
LATENT_STD = (5.27, 5.91, 4.21, 4.31)
CONSISTENCY_STEPS = 100_000


def spec_name(resolution: int, kind: str, size: str) -> str:
    return f"imagenet{resolution}_{kind}_{size}"


def _data(resolution: int) -> DataSpec:
    if resolution == 64:
        return DataSpec(name="imagenet64", normalize="pixel", workers=4)
    return DataSpec(name="imagenet512-sdvae", normalize="channel", mean=LATENT_MEAN, std=LATENT_STD, workers=4)


def _objective(resolution: int, kind: str, size: str) -> ObjectiveSpec:
    if kind == "diffusion":
        P_mean, P_std = (-0.8, 1.6) if resolution == 64 else (-0.4, 1.0)
        return ObjectiveSpec(kind="diffusion", sigma_d=0.5, P_mean=P_mean, P_std=P_std,
                             label_dropout=0.1 if resolution == 512 else 0.0)
    teacher = f"runs/{spec_name(resolution, 'diffusion', size)}/ckpt.safetensors"
    return ObjectiveSpec(
        kind=kind, sigma_d=0.5, P_mean=-1.0 if resolution == 64 else -0.8, P_std=1.6, tangent_c=0.1,
        warmup_images=10_000 * BATCH, adaptive_weighting=True,
        teacher=teacher if kind == "scd" else "",
        guidance=(1.0, 2.0) if resolution == 512 else (1.0, 1.0),
    )


def imagenet_spec(resolution: int, kind: str, size: str) -> Spec:
    """The spec `imagenet{resolution}_{kind}_{size}` from the table above."""
    if size not in SIZES[resolution] or kind not in KINDS[resolution]:
        raise ValueError(f"no ImageNet {resolution} spec for {kind} {size}")
    teacher_run = f"runs/{spec_name(resolution, 'diffusion', size)}/ckpt.safetensors"
    dropout = TEACHER_DROPOUT[size]
    dropout_resolutions: tuple[int, ...] = ()
    if kind == "sct":
        dropout, dropout_resolutions = 0.45, (16, 8)  # sCM: sCT dropout 0.45 at resolutions <= 16
    lr = TEACHER_LR[size] * (1.0 if kind == "diffusion" else 0.01)
    steps = TEACHER_MIMG[resolution][size] * MIMG // BATCH if kind == "diffusion" else CONSISTENCY_STEPS
    return Spec(
        name=spec_name(resolution, kind, size),
        data=_data(resolution),
        net=NetSpec(arch="edm2", dropout=dropout, class_conditional=True,
                    edm2=dataclasses.replace(EDM2_SIZES[size.upper()].spec(), dropout_resolutions=dropout_resolutions)),
        objective=_objective(resolution, kind, size),
        optim=OptimSpec(kind="adam", lr=lr, betas=(0.9, 0.99), eps=1e-11, lr_rampup_images=10_000_000,
                        lr_decay_images=DECAY_STEPS[resolution] * BATCH),
        train=TrainSpec(
            batch=BATCH, total_images=steps * BATCH, ema_halflife_images=float(steps * BATCH), ema_rampup=0.08,  # the ramp binds
            precision="fp16" if resolution == 64 else "bf16",
            init_from=teacher_run if kind == "sct" else "",
            log_every_images=100 * BATCH, sample_every_images=5_000 * BATCH, ckpt_every_images=2_500 * BATCH,
            keep_last=4,
        ),
    )


def all_specs() -> list[tuple[int, str, str]]:
    """(resolution, kind, size) of every ImageNet spec file."""
    return [(r, k, s) for r in (64, 512) for k in KINDS[r] for s in SIZES[r]]


def spec_file_text(resolution: int, kind: str, size: str) -> str:
    """The text of `specs/imagenet{resolution}_{kind}_{size}.py`."""
    what = {"diffusion": "the EDM2 diffusion teacher (TrigFlow)", "sct": "sCT, finetuned from the diffusion teacher",
            "scd": "sCD of the diffusion teacher"}[kind]
    data = "pixels (shards/imagenet64)" if resolution == 64 else "SD-VAE latents (shards/imagenet512-sdvae)"
    first = f"runs/{spec_name(resolution, 'diffusion', size)}/ckpt.safetensors"
    needs = "" if kind == "diffusion" else f"\nNeeds the teacher's checkpoint {first} (train imagenet{resolution}_diffusion_{size} first).\n"
    return (
        f'"""ImageNet {resolution}, EDM2-{size.upper()}: {what}, on {data}.\n'
        f"{needs}\n"
        f"Settings: specs/_imagenet.py (sCM Appendix G); `just train specs/{spec_name(resolution, kind, size)}.py --help` lists them.\n"
        '"""\n\n'
        "from _imagenet import imagenet_spec  # noqa: E402  (specs/ is on the path while a spec loads)\n\n"
        f'SPEC = imagenet_spec({resolution}, "{kind}", "{size}")\n'
    )


def write_spec_files(folder: Path) -> list[Path]:
    """(Re)write every ImageNet spec file in `folder` from the table."""
    paths = []
    for r, k, s in all_specs():
        path = folder / f"{spec_name(r, k, s)}.py"
        path.write_text(spec_file_text(r, k, s))
        paths.append(path)
    return paths


def _check() -> None:
    for r, k, s in all_specs():
        dataclasses.asdict(imagenet_spec(r, k, s))


if __name__ == "__main__":
    _check()
    for p in write_spec_files(Path(__file__).resolve().parent):
        print(f"wrote {p}")
