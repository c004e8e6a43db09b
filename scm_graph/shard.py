"""Write an image dataset as webdataset shards plus a manifest: `python -m scm_graph.shard SOURCE ...`.

    python -m scm_graph.shard digits
    python -m scm_graph.shard cifar10 --src cifar-10-python.tar.gz [--split test]
    python -m scm_graph.shard folder --src DIR --resolution 64 [--no-labels]

The sources live in `scm_graph.data` (digits, cifar10, folder), the writer in `scm_graph.data.writer`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scm_graph.data.cifar10 import cifar10_source
from scm_graph.data.digits import digits_source
from scm_graph.data.folder import folder_source
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
    sub.add_parser("digits", parents=[common], help="sklearn's 8x8 digits (1x8x8, 10 classes)")
    c = sub.add_parser("cifar10", parents=[common], help="CIFAR-10, official python version")
    c.add_argument("--src", required=True, help="cifar-10-python.tar.gz or the extracted cifar-10-batches-py/")
    c.add_argument("--split", choices=("train", "test"), default="train", help="default: train")
    f = sub.add_parser("folder", parents=[common], help="a folder of images (sub-folders = classes)")
    f.add_argument("--src", required=True, help="folder of png/jpg/jpeg/webp/bmp/gif/tif images (recursive)")
    f.add_argument("--resolution", type=int, required=True, help="output side R (bicubic resize + centre crop)")
    f.add_argument("--no-labels", action="store_true", help="ignore class sub-folders")
    f.add_argument("--jobs", type=int, default=1, help="processes decoding images (default: 1)")
    return p


def _make_source(args: argparse.Namespace) -> Source:
    if args.source == "digits":
        return digits_source()
    if args.source == "cifar10":
        return cifar10_source(args.src, args.split)
    return folder_source(args.src, args.resolution, labels=not args.no_labels, jobs=args.jobs)


def _default_name(args: argparse.Namespace) -> str:
    """The set name before the source is loaded (so an existing set is refused early)."""
    if args.name:
        return args.name
    if args.source == "cifar10":
        return "cifar10" if args.split == "train" else "cifar10-test"
    if args.source == "folder":
        return Path(args.src).resolve().name
    return args.source


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
