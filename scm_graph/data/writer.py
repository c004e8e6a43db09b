"""Writing a Source as webdataset shards plus its manifest, atomically (temp folder + rename).

Output: `<out>/<name>/shard-000000.tar ...` and `<out>/<name>/manifest.json` (see `scm_graph.data.manifest`).
Each sample holds `png` (uint8, 1 or 3 channels), for labelled sets `cls` (the label as text), and
`sha256` (the manifest's `sample_digest` of the other members; the reader checks it before decoding).
"""

from __future__ import annotations

import io
import math
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from scm_graph.data.manifest import CHECKSUM, MANIFEST, Manifest, sample_digest
from scm_graph.data.source import Source
from scm_graph.errors import UserError
from scm_graph.paths import pid_alive
from scm_graph.progress import Progress


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


def _check_out(out: Path) -> None:
    """`--out` is a folder we can write, or one we can create (its nearest existing parent is a writable folder)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    base = out.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"--out {out} cannot be created: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        if base == out.absolute():
            raise UserError(f"--out {out} is not writable")
        raise UserError(f"--out {out} cannot be created: {base} is not writable")


def check_destination(out: Path, name: str, force: bool) -> Path:
    """`<out>/<name>`; UserError if out cannot hold it, or it exists and force is off (nothing is touched)."""
    _check_name(name)
    _check_out(out)
    dest = out / name
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder")
    return dest


def _progress(enabled: bool, total: int) -> Progress:
    """A bar on a terminal, a plain line every 30 s otherwise (a long folder under nohup), nothing when disabled."""
    return Progress("writing shards", total, mode="auto" if enabled else "off", every_s=30.0)


def remove_dead_temps_of(out: Path, name: str) -> list[Path]:
    """Remove the temp and old folders of set `name` in `out` that a killed writer left; returns them."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-([1-9][0-9]*)-[0-9a-f]{{8}}")
    removed = []
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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
    with _progress(progress, source.count) as bar:
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
                sample[CHECKSUM] = sample_digest(sample).encode("ascii")
                writer.write(sample)
                moments.add(image)
                counts[-1] += 1
                index += 1
                bar.update(index)
        except OSError as e:  # the shard being written is the likely culprit when the error names no file
            raise _write_error(e, folder / names[-1] if names else folder) from None
        finally:
            if writer is not None:
                _close(writer, folder / names[-1])
    if index != source.count:
        raise UserError(f"source yielded {index} samples, expected {source.count}")
    return names, counts, moments


def _close(writer, path: Path) -> None:
    """Close a TarWriter (this flushes the end of the archive); OSError -> UserError naming the file."""
    try:
        writer.close()
    except OSError as e:
        raise _write_error(e, path) from None


def _write_error(e: OSError, path: Path) -> UserError:
    """One line naming the file and the system's reason."""
    return UserError(f"cannot write {e.filename or path}: {e.strerror or e}")


def _check_stats(std: tuple[float, ...]) -> None:
    """The reader needs std > 0 in every channel."""
    for c, s in enumerate(std):
        if not s > 0:
            raise UserError(f"channel {c} of the source is constant (std {s}); it cannot be normalised")


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
    if shard_size <= 0:
        raise UserError(f"--shard-size must be positive, not {shard_size}")
    if source.count <= 0:
        raise UserError("the source holds no images")
    if source.class_names is not None and not source.class_names:
        raise UserError("the source is labelled but has no classes")
    out = Path(out)
    name = name or source.name
    dest = check_destination(out, name, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(out, f".{name}.tmp")
    except OSError as e:
        raise _write_error(e, out) from None
    try:
        shards, counts, moments = _write_shards(source, tmp, shard_size, progress)
        mean, std = moments.mean_std()
        _check_stats(std)
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
            sample_checksum=CHECKSUM,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        check_destination(out, name, force)  # still ours to write?
        _swap_into_place(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
