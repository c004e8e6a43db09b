"""CIFAR-10 from the official python release (cifar-10-python.tar.gz or its extracted folder), read without pickle's code execution."""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from scm_graph.data.source import Source, array_source
from scm_graph.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


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
    return array_source(name, f"{path.resolve()} (cifar10 {split})", images, labels, names)
