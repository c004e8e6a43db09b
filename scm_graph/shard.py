"""Write an image dataset as webdataset shards plus a manifest: `python -m scm_graph.shard SOURCE ...`.

    python -m scm_graph.shard digits [--split train | heldout]
    python -m scm_graph.shard cifar10 --src cifar-10-python.tar.gz [--split test]
    python -m scm_graph.shard folder --src DIR --resolution 64 [--no-labels]
    python -m scm_graph.shard imagenet --src DIR --resolution 64                            # -> shards/imagenet64
    python -m scm_graph.shard imagenet --src DIR --resolution 512 --vae sd-vae-ft-mse/      # -> shards/imagenet512-sdvae

The sources live in `scm_graph.data` (digits, cifar10, folder), the writer in `scm_graph.data.writer`.
ImageNet (`scm_graph.data.imagenet`, a class-folder tree: the root holding train/, or train/ itself) is
written by the resumable writer (`scm_graph.data.resumable`): a stopped job continues when the same
command is run again, unreadable images are skipped and counted, and with --vae the images are stored
as SD-VAE posteriors (`scm_graph.data.codec`, `scm_graph.data.vae`) instead of PNGs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scm_graph.data.cifar10 import cifar10_source
from scm_graph.data.codec import LATENT_DTYPES, LatentCodec, PixelCodec
from scm_graph.data.digits import N_HELDOUT, SPLITS, digits_source, set_name
from scm_graph.data.folder import folder_source
from scm_graph.data.imagenet import class_folders, list_class_files
from scm_graph.data.manifest import LATENT_STORED
from scm_graph.data.resumable import write_resumable
from scm_graph.data.source import Source, skipped_summary
from scm_graph.data.writer import check_destination, remove_dead_temps_of, write_set
from scm_graph.errors import ArgumentParser, UserError, cli_main


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m scm_graph.shard", description="Write an image dataset as webdataset shards.")
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = ArgumentParser(add_help=False)
    common.add_argument("--out", default="shards", help="root folder of the shard sets (default: shards)")
    common.add_argument("--name", default=None, help="shard set name (default: the source name)")
    common.add_argument("--shard-size", type=int, default=10000, help="samples per tar file (default: 10000)")
    common.add_argument("--force", action="store_true", help="replace an existing shard set")
    d = sub.add_parser("digits", parents=[common], help="sklearn's 8x8 digits (1x8x8, 10 classes)")
    d.add_argument("--split", choices=SPLITS, default="all",
                   help=f"all 1797 (default), or train / heldout: a fixed split holding back {N_HELDOUT} images, to score "
                        "FD against images the model never saw (default names digits-train, digits-heldout)")
    c = sub.add_parser("cifar10", parents=[common], help="CIFAR-10, official python version")
    c.add_argument("--src", required=True, help="cifar-10-python.tar.gz or the extracted cifar-10-batches-py/")
    c.add_argument("--split", choices=("train", "test"), default="train", help="default: train")
    f = sub.add_parser("folder", parents=[common], help="a folder of images (sub-folders = classes)")
    f.add_argument("--src", required=True, help="folder of png/jpg/jpeg/webp/bmp/gif/tif images (recursive)")
    f.add_argument("--resolution", type=int, required=True, help="output side R (bicubic resize + centre crop)")
    f.add_argument("--no-labels", action="store_true", help="ignore class sub-folders")
    f.add_argument("--jobs", type=int, default=1, help="processes decoding images (default: 1)")
    i = sub.add_parser("imagenet", parents=[common], help="ImageNet's class folders (resumable; pixels or VAE latents)")
    i.add_argument("--src", required=True, help="the ImageNet root holding train/, or the class-folder tree itself")
    i.add_argument("--resolution", type=int, required=True, help="image side R (ADM / EDM2 centre crop), e.g. 64 or 512")
    i.add_argument("--jobs", type=int, default=1, help="processes decoding images ahead of the writer (default: 1; "
                   "8 or more for the full set)")
    i.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder: store its latents, not pixels")
    i.add_argument("--device", default=None, help="with --vae: where it encodes (default: auto, cuda when present)")
    i.add_argument("--batch", type=int, default=None, help="with --vae: images per encoder call (default: 32)")
    i.add_argument("--dtype", choices=LATENT_DTYPES, default=None, help="with --vae: stored dtype (default: float16)")
    i.add_argument("--latent", choices=LATENT_STORED, default=None,
                   help="with --vae: mean_std = the posterior's mean and std (EDM2, default), mean = its mean")
    return p


def _make_source(args: argparse.Namespace) -> Source:
    if args.source == "digits":
        return digits_source(args.split)
    if args.source == "cifar10":
        return cifar10_source(args.src, args.split)
    return folder_source(args.src, args.resolution, labels=not args.no_labels, jobs=args.jobs)


def _default_name(args: argparse.Namespace) -> str:
    """The set name before the source is loaded (so an existing set is refused early)."""
    if args.name:
        return args.name
    if args.source == "cifar10":
        return "cifar10" if args.split == "train" else "cifar10-test"
    if args.source == "digits":
        return set_name(args.split)
    if args.source == "folder":
        return Path(args.src).resolve().name
    if args.source == "imagenet":
        return f"imagenet{args.resolution}" + ("-sdvae" if args.vae else "")
    return args.source


def _imagenet_codec(args: argparse.Namespace) -> PixelCodec | LatentCodec:
    """PNG pixels, or (--vae) the latents of the VAE loaded on --device; one-line UserError for bad values."""
    latent_flags = {"--device": args.device, "--batch": args.batch, "--dtype": args.dtype, "--latent": args.latent}
    if not args.vae:
        given = [flag for flag, value in latent_flags.items() if value is not None]
        if given:
            raise UserError(f"{given[0]} only applies with --vae (it sets how latents are encoded)")
        return PixelCodec(args.resolution)
    batch = 32 if args.batch is None else args.batch
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    from scm_graph.data.vae import load_vae
    from scm_graph.device import pick_device

    vae = load_vae(args.vae, pick_device(args.device or "auto"))
    return LatentCodec(vae, args.resolution, args.dtype or "float16", args.latent or "mean_std", batch)


def _shard_imagenet(args: argparse.Namespace, name: str, t0: float) -> None:
    """`shard imagenet`: the resumable writer over the class folders, then the summary lines."""
    if args.resolution <= 0:
        raise UserError(f"--resolution must be positive, not {args.resolution}")
    root, classes = class_folders(args.src)  # cheap checks before a VAE is loaded or 1.28M files are listed
    codec = _imagenet_codec(args)
    files = list_class_files(root, classes)
    if files.skipped:
        print(skipped_summary(files.skipped), flush=True)
    description = f"ImageNet class folders {root}, ADM / EDM2 centre crop to {args.resolution} px"
    if isinstance(codec, LatentCodec):
        description += f", encoded by {codec.vae.path} ({codec.stored}, {codec.dtype})"
    done = write_resumable(files, codec, args.out, name, args.shard_size, args.force, args.jobs, description=description)
    if done.unreadable:
        print(skipped_summary(tuple(("unreadable", f) for f, _ in done.unreadable)), flush=True)
    m = done.manifest
    size = sum(m.shard_bytes) / 2**20
    shape = "x".join(map(str, m.shape))
    if m.latent is None:
        what = f"{m.count} images {shape}"
    else:
        what = f"{m.count} latents {shape} ({m.latent.stored}, {m.dtype}) of {m.latent.image_resolution} px images"
    rate = f", {done.images_now / done.seconds:.1f} images/s" if m.latent is not None and done.images_now else ""
    print(f"wrote {what} ({m.num_classes} classes) in {len(m.shards)} shard(s), {size:.1f} MiB, "
          f"to {Path(args.out) / m.name} in {time.perf_counter() - t0:.1f}s{rate}")


@cli_main
def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m scm_graph.shard`."""
    args = _build_parser().parse_args(argv)
    if args.shard_size <= 0:
        raise UserError(f"--shard-size must be positive, not {args.shard_size}")
    if getattr(args, "jobs", 1) < 1:
        raise UserError(f"--jobs must be at least 1, not {args.jobs}")
    name = _default_name(args)
    check_destination(Path(args.out), name, args.force)
    removed = remove_dead_temps_of(Path(args.out), name)
    if removed:
        print(f"tidied {args.out}: removed {len(removed)} unfinished copy(ies) of {name} left by killed writes", flush=True)
    t0 = time.perf_counter()
    if args.source == "imagenet":
        return _shard_imagenet(args, name, t0)
    source = _make_source(args)
    if source.skipped:
        print(skipped_summary(source.skipped), flush=True)
    m = write_set(source, args.out, name, args.shard_size, args.force)
    dest = Path(args.out) / m.name
    size = sum(m.shard_bytes) / 2**20
    labels = f"{m.num_classes} classes" if m.labels else "no labels"
    print(
        f"wrote {m.count} images {'x'.join(map(str, m.shape))} ({labels}) in {len(m.shards)} shard(s), "
        f"{size:.1f} MiB, to {dest} in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
