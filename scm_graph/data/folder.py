"""A folder of images (recursive; immediate sub-folders are classes), resized and centre-cropped as ADM / EDM2 do."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from scm_graph.data.source import Source
from scm_graph.errors import UserError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


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
    """Read one image file (a GIF's first frame) as uint8 [3, R, R]; UserError naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(center_crop(rgb, resolution).transpose(2, 0, 1))


def _skip_reason(rel: Path) -> str | None:
    """Why a file (path relative to src) is not an image to read: "hidden", its extension, or "no extension"."""
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if rel.suffix.lower() not in IMAGE_EXTS:
        return rel.suffix.lower() or "no extension"
    return None


def _list_images(src: Path) -> tuple[list[Path], tuple[tuple[str, str], ...]]:
    """(image files under src, recursive, sorted by relative path; (reason, name) of every other file)."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for p in sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix()):
        if not p.is_file():
            continue
        rel = p.relative_to(src)
        reason = _skip_reason(rel)
        if reason is None:
            files.append(p)
        else:
            skipped.append((reason, rel.as_posix()))
    return files, tuple(skipped)


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
    files, skipped = _list_images(src)
    if not files:
        raise UserError(f"--src {src}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    found = _folder_labels(src, files) if labels else None
    label_list: list[int | None] = list(found[0]) if found else [None] * len(files)
    order = np.random.default_rng(0).permutation(len(files))  # mix classes across shards, reproducibly
    images = _load_images([files[i] for i in order], resolution, jobs)
    samples = zip(images, [label_list[i] for i in order])
    names = found[1] if found else None
    shape = (3, resolution, resolution)
    return Source(src.resolve().name, str(src.resolve()), shape, len(files), names, samples, skipped)
