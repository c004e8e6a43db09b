"""Write an image dataset as webdataset shards plus a manifest.

    python -m scm_graph.shard digits
    python -m scm_graph.shard cifar10 --src cifar-10-python.tar.gz [--split test]
    python -m scm_graph.shard folder --src DIR --resolution 64 [--no-labels]

Output: `<out>/<name>/shard-000000.tar ...` and `<out>/<name>/manifest.json` (see scm_graph.data.Manifest).
Each sample holds `png` (uint8, 1 or 3 channels) and, for labelled sets, `cls` (the label as text).
"""

from __future__ import annotations

import argparse
import codecs
import io
import math
import os
import pickle
import secrets
import shutil
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from scm_graph.errors import ArgumentParser, UserError, cli_main

if TYPE_CHECKING:  # scm_graph.data imports torch; the CLI loads it only when it writes
    from scm_graph.data import Manifest

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


@dataclass
class Source:
    """A dataset ready to be written: uint8 CHW images with optional labels."""

    name: str
    """Default shard set name."""
    description: str
    """Where it came from (stored as the manifest's `source`)."""
    shape: tuple[int, int, int]
    count: int
    class_names: tuple[str, ...] | None
    """None = unlabelled."""
    samples: Iterable[tuple[np.ndarray, int | None]]
    """`count` pairs of (uint8 [C, H, W], label or None)."""


# ---------------------------------------------------------------------------------------------
# Sources


def digits_source() -> Source:
    """sklearn's 8x8 digits (1x8x8, labels 0..9)."""
    from scm_graph.digits import load_digits_uint8

    images, labels = load_digits_uint8()
    return _array_source("digits", "sklearn.datasets.load_digits", images, labels, tuple(str(i) for i in range(10)))


def _array_source(name: str, desc: str, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> Source:
    """A Source over in-memory arrays."""
    samples = ((images[i], int(labels[i])) for i in range(len(images)))
    return Source(name, desc, tuple(images.shape[1:]), len(images), names, samples)  # type: ignore[arg-type]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy needs to rebuild arrays; never arbitrary code."""

    _reconstruct = np.array(0).__reduce__()[0]
    _scalar = np.float64(0).__reduce__()[0]
    _frombuffer = np.array(0).__reduce_ex__(5)[0]
    SAFE = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.SAFE[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle CIFAR batch bytes with the numpy-only unpickler; UserError naming `where` otherwise."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure is a bad input file
        raise UserError(f"{where}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None


def _str_keys(d: Any, where: str) -> dict[str, Any]:
    """A batch dict with str keys (the originals are Python 2 byte strings)."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: not a CIFAR-10 python batch (not a dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _cifar_members_from_tar(path: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Read the wanted members (by base name) straight from a CIFAR tar(.gz), no extraction."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                base = PurePosixPath(member.name).name
                if member.isfile() and base in wanted and base not in found:
                    f = tf.extractfile(member)
                    assert f is not None
                    found[base] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read the CIFAR-10 archive ({type(e).__name__}: {e})") from None
    return found


def _cifar_members_from_dir(folder: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Read the wanted batch files from an extracted cifar-10-batches-py folder."""
    return {w: (folder / w).read_bytes() for w in wanted if (folder / w).is_file()}


def _locate_cifar(src: Path) -> tuple[Path, bool]:
    """(path, is_archive) for a tar.gz, a cifar-10-batches-py folder or the folder that holds either."""
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise UserError(f"--src {src} is not a tar archive (want cifar-10-python.tar.gz)")
        return src, True
    for cand in (src, src / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() or (cand / "test_batch").is_file():
            return cand, False
    if (src / "cifar-10-python.tar.gz").is_file():
        return src / "cifar-10-python.tar.gz", True
    raise UserError(f"--src {src}: no CIFAR-10 python batches (data_batch_1..5, test_batch) found")


def _parse_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [n, 3, 32, 32], int64 [n])."""
    d = _str_keys(safe_unpickle(raw, where), where)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{where}: not a CIFAR-10 python batch (data must be uint8 [n, 3072])")
    try:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        lab = np.zeros(0, dtype=np.int64)
    if len(lab) != len(data) or (len(lab) and (lab.min() < 0 or lab.max() > 9)):
        raise UserError(f"{where}: not a CIFAR-10 python batch (labels must be n ints in 0..9)")
    return data.reshape(-1, 3, 32, 32), lab


def _cifar_class_names(raw: bytes | None, where: str) -> tuple[str, ...]:
    """Class names from batches.meta when present and sane, else the standard ten."""
    if raw is None:
        return CIFAR10_CLASSES
    names = _str_keys(safe_unpickle(raw, where), where).get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        return CIFAR10_CLASSES
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def cifar10_source(src: str | Path, split: str = "train") -> Source:
    """CIFAR-10 from the official python-pickle release (tar.gz or extracted folder)."""
    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, not {split!r}")
    path, is_archive = _locate_cifar(Path(src))
    batch_names = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
    wanted = (*batch_names, "batches.meta")
    raw = _cifar_members_from_tar(path, wanted) if is_archive else _cifar_members_from_dir(path, wanted)
    missing = [b for b in batch_names if b not in raw]
    if missing:
        raise UserError(f"--src {path}: not a CIFAR-10 python archive (missing {', '.join(missing)})")
    parts = [_parse_cifar_batch(raw[b], f"{path}:{b}") for b in batch_names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = _cifar_class_names(raw.get("batches.meta"), f"{path}:batches.meta")
    name = "cifar10" if split == "train" else "cifar10-test"
    return _array_source(name, f"{path.resolve()} (cifar10 {split})", images, labels, names)


def center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM/EDM2 ImageNet preprocessing: box-halve while >= 2R, bicubic shorter side -> R, centre crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(max(resolution, round(s * scale)) for s in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[y : y + resolution, x : x + resolution]


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Read one image file as uint8 [3, R, R]; UserError naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(center_crop(rgb, resolution).transpose(2, 0, 1))


def _list_images(src: Path) -> list[Path]:
    """All image files under src (recursive, hidden paths skipped), sorted by relative path."""
    files = [
        p
        for p in src.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS
        and not any(part.startswith(".") for part in p.relative_to(src).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def _folder_labels(src: Path, files: list[Path]) -> tuple[list[int], tuple[str, ...]] | None:
    """ImageFolder labels (index of the sorted immediate sub-folder), or None if images sit in src itself."""
    tops = [p.relative_to(src).parts for p in files]
    if any(len(parts) == 1 for parts in tops):
        return None
    names = tuple(sorted({parts[0] for parts in tops}))
    index = {n: i for i, n in enumerate(names)}
    return [index[parts[0]] for parts in tops], names


def _load_images(files: list[Path], resolution: int, jobs: int) -> Iterator[np.ndarray]:
    """Images in file order, decoded in `jobs` processes when jobs > 1."""
    if jobs <= 1:
        for f in files:
            yield load_image(f, resolution)
        return
    import functools
    import multiprocessing

    with multiprocessing.Pool(jobs) as pool:
        yield from pool.imap(functools.partial(load_image, resolution=resolution), files, chunksize=16)


def folder_source(src: str | Path, resolution: int, labels: bool = True, jobs: int = 1) -> Source:
    """A folder of images (recursive); labels from immediate sub-folders unless labels=False.

    Files are written in a fixed pseudo-random order (seed 0) so that every shard mixes all classes.
    """
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder")
    if resolution <= 0:
        raise UserError(f"--resolution must be positive, not {resolution}")
    files = _list_images(src)
    if not files:
        raise UserError(f"--src {src}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    found = _folder_labels(src, files) if labels else None
    label_list: list[int | None] = list(found[0]) if found else [None] * len(files)
    order = np.random.default_rng(0).permutation(len(files))  # mix classes across shards, reproducibly
    images = _load_images([files[i] for i in order], resolution, jobs)
    samples = zip(images, [label_list[i] for i in order])
    names = found[1] if found else None
    return Source(src.resolve().name, str(src.resolve()), (3, resolution, resolution), len(files), names, samples)


# ---------------------------------------------------------------------------------------------
# Writing


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) -> PNG bytes (gray or RGB)."""
    hwc = image.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Moments:
    """Exact per-channel sums of x and x^2 (integers), turned into float64 mean/std at the end."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s = [0] * channels
        self.q = [0] * channels

    def add(self, image: np.ndarray) -> None:
        flat = image.reshape(image.shape[0], -1).astype(np.int64)
        self.n += flat.shape[1]
        for c, (s, q) in enumerate(zip(flat.sum(1), (flat * flat).sum(1))):
            self.s[c] += int(s)
            self.q[c] += int(q)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        n = self.n
        mean = tuple(s / n for s in self.s)
        std = tuple(math.sqrt((q * n - s * s) / (n * n)) for s, q in zip(self.s, self.q))
        return mean, std


def _check_name(name: str) -> None:
    """A set name is one plain folder name."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise UserError(f"--name must be a plain folder name, not {name!r}")


def check_destination(out: Path, name: str, force: bool) -> Path:
    """`<out>/<name>`; UserError if it exists and force is off (nothing is touched)."""
    _check_name(name)
    dest = out / name
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder")
    return dest


def _progress(enabled: bool):
    """A rich progress bar on an interactive stdout (a no-op otherwise)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]writing shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not (enabled and sys.stdout.isatty()),
        transient=True,
    )


def _write_shards(
    source: Source, folder: Path, shard_size: int, progress: bool
) -> tuple[list[str], list[int], _Moments]:
    """Write all samples into `folder` as shard-NNNNNN.tar; returns (names, counts, moments)."""
    import webdataset as wds

    moments = _Moments(source.shape[0])
    names: list[str] = []
    counts: list[int] = []
    width = max(8, len(str(source.count)))
    writer = None
    index = 0
    with _progress(progress) as bar:
        task = bar.add_task("write", total=source.count)
        try:
            for image, label in source.samples:
                if image.shape != source.shape or image.dtype != np.uint8:
                    got, want = f"{image.dtype} {list(image.shape)}", f"uint8 {list(source.shape)}"
                    raise UserError(f"sample {index} is {got}, expected {want}")
                if writer is None or counts[-1] == shard_size:
                    if writer is not None:
                        writer.close()
                    names.append(f"shard-{len(names):06d}.tar")
                    counts.append(0)
                    writer = wds.TarWriter(str(folder / names[-1]), encoder=False, mtime=0)
                sample = {"__key__": f"{index:0{width}d}", "png": encode_png(image)}
                if source.class_names is not None:
                    sample["cls"] = str(label).encode("ascii")
                writer.write(sample)
                moments.add(image)
                counts[-1] += 1
                index += 1
                bar.advance(task)
        finally:
            if writer is not None:
                writer.close()
    if index != source.count:
        raise UserError(f"source yielded {index} samples, expected {source.count}")
    return names, counts, moments


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in parent (created with the user's umask, unlike mkdtemp)."""
    for _ in range(100):
        path = parent / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot create a temporary folder in {parent}")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished temp folder to dest, replacing an old dest only after the new one is complete."""
    if dest.exists():
        old = _fresh_dir(dest.parent, f".{dest.name}.old")
        os.rename(dest, old / dest.name)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def write_set(
    source: Source,
    out: str | Path = "shards",
    name: str | None = None,
    shard_size: int = 10000,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write `source` to `<out>/<name>/` (temp folder + rename) and return its manifest."""
    from scm_graph.data import MANIFEST, Manifest

    if shard_size <= 0:
        raise UserError(f"--shard-size must be positive, not {shard_size}")
    if source.count <= 0:
        raise UserError("the source holds no images")
    out = Path(out)
    name = name or source.name
    dest = check_destination(out, name, force)
    out.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out, f".{name}.tmp")
    try:
        shards, counts, moments = _write_shards(source, tmp, shard_size, progress)
        mean, std = moments.mean_std()
        labelled = source.class_names is not None
        manifest = Manifest(
            name=name,
            count=source.count,
            shape=source.shape,
            dtype="uint8",
            format="png",
            mean=mean,
            std=std,
            num_classes=len(source.class_names) if source.class_names else 0,
            labels=labelled,
            class_names=source.class_names,
            source=source.description,
            shards=tuple(shards),
            shard_counts=tuple(counts),
            shard_bytes=tuple((tmp / s).stat().st_size for s in shards),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        check_destination(out, name, force)  # still ours to write?
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI


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
    f.add_argument("--src", required=True, help="folder of png/jpg/jpeg/webp/bmp images (recursive)")
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
    name = _default_name(args)
    check_destination(Path(args.out), name, args.force)
    t0 = time.perf_counter()
    source = _make_source(args)
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
