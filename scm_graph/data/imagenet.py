"""ImageNet as a class-folder tree (`train/n01440764/*.JPEG ...`): listing, labels, and decoding that skips bad files.

Labels are the index of the class folder in the sorted folder names (torchvision's ImageFolder, EDM2's
dataset_tool). Files are listed recursively inside the class folders and put in a fixed pseudo-random
order (seed 0), so every shard mixes the classes. Each image gets the ADM / EDM2 centre crop
(`scm_graph.data.folder.center_crop`). An image that cannot be decoded is skipped and counted, not fatal:
a 1.28M-image job must not die at image 900k. The resumable writer (`scm_graph.data.resumable`) uses this.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scm_graph.data.folder import IMAGE_EXTS, _list_images, load_image
from scm_graph.errors import UserError, first_line


@dataclass(frozen=True)
class ClassFiles:
    """The image files of a class-folder tree, in the order they are written."""

    root: Path
    """The folder holding the class folders (absolute)."""
    class_names: tuple[str, ...]
    """Sorted class folder names; a label is an index into them."""
    files: tuple[str, ...]
    """Paths relative to root (posix), in write order."""
    labels: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(reason, name) of each file that is not an image (see `scm_graph.data.source.skipped_summary`)."""

    def digest(self) -> str:
        """sha256 of the ordered (label, file) list: a job's identity, cheap to recompute on a rerun."""
        h = hashlib.sha256()
        for label, name in zip(self.labels, self.files):
            h.update(f"{label}\t{name}\n".encode())
        return h.hexdigest()


def class_folders(src: str | Path) -> tuple[Path, tuple[str, ...]]:
    """(root, sorted class names) of `src` or of its `train/`; one-line UserError unless it holds class folders.

    Cheap (one folder listing), so the CLI can check `--src` before it loads a VAE or lists 1.28M files."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder")
    root = src / "train" if (src / "train").is_dir() else src
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"--src {root}: cannot list it ({e.strerror or type(e).__name__})") from None
    if not names:
        raise UserError(f"--src {root} has no class sub-folders (expected ImageNet's train/n01440764/*.JPEG ...: "
                        "one sub-folder of images per class)")
    return root.resolve(), tuple(names)


def list_class_files(root: Path, class_names: tuple[str, ...]) -> ClassFiles:
    """The image files under each class folder (recursive), labelled, in the fixed write order (seed 0).

    Files that are not images, and files beside the class folders, are left out and recorded in `skipped`."""
    found: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.is_file() and not p.name.startswith("."):
            skipped.append(("outside class folders", p.name))
    for label, name in enumerate(class_names):
        folder = root / name
        files, others = _list_images(folder)  # the folder source's listing, within this class folder
        found += [(p.relative_to(root).as_posix(), label) for p in files]
        skipped += [(reason, f"{name}/{rel}") for reason, rel in others]
        if not files:
            raise UserError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                            "every class folder needs at least one")
    order = np.random.default_rng(0).permutation(len(found))  # mix classes across shards, reproducibly
    return ClassFiles(root, class_names, tuple(found[i][0] for i in order), tuple(found[i][1] for i in order),
                      tuple(skipped))


def list_imagenet(src: str | Path) -> ClassFiles:
    """`class_folders` then `list_class_files`."""
    return list_class_files(*class_folders(src))


def read_image(path: str | Path, resolution: int) -> np.ndarray | str:
    """uint8 [3, R, R] after the ADM / EDM2 centre crop, or, if the file cannot be decoded, why (a one-line str)."""
    try:
        with warnings.catch_warnings():  # "Corrupt EXIF data" and the like: the image itself is fine
            warnings.simplefilter("ignore")
            return load_image(Path(path), resolution)
    except UserError as e:
        return first_line(e)
    except Exception as e:  # noqa: BLE001 - a decoder may fail in other ways on bad bytes; one file must not end the job
        return f"cannot read image {path} ({type(e).__name__}: {first_line(e)})"


def _read_many(paths: list[str], resolution: int) -> list[np.ndarray | str]:
    return [read_image(p, resolution) for p in paths]


def _quiet_worker() -> None:
    """A decoding process leaves Ctrl-C to the main process (which stops it), and does not print a traceback of
    the broken pipe when the main process was killed (its errors reach the main process as results anyway)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def read_images(paths: Sequence[str | Path], resolution: int, jobs: int = 1, chunk: int = 8) -> Iterator[np.ndarray | str]:
    """`read_image` of each path, in order. With jobs > 1, `jobs` processes decode ahead of the consumer while it
    works (encoding on a GPU, say), at most 2 x jobs chunks of `chunk` images ahead, so memory stays bounded."""
    if jobs <= 1:
        for p in paths:
            yield read_image(p, resolution)
        return
    import multiprocessing

    chunks = (list(map(str, paths[i : i + chunk])) for i in range(0, len(paths), chunk))
    with multiprocessing.Pool(jobs, initializer=_quiet_worker) as pool:
        ahead = deque(pool.apply_async(_read_many, (c, resolution)) for c in itertools.islice(chunks, 2 * jobs))
        while ahead:
            done = ahead.popleft().get()
            nxt = next(chunks, None)
            if nxt is not None:
                ahead.append(pool.apply_async(_read_many, (nxt, resolution)))
            yield from done
