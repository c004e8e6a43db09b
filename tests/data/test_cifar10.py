"""CIFAR-10 source: archive, extracted folder and parent folder, splits, pickles that try to run code, bad inputs."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from scm_graph.data.cifar10 import cifar10_source
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from tests.data.setfiles import read_set


def _batch(rng: np.random.Generator, n: int) -> dict:
    return {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"filenames": [b"f%d.png" % i for i in range(n)],
    }


def make_fake_cifar(root: Path, n: int = 4, evil: bytes | None = None) -> tuple[Path, Path, dict[str, dict]]:
    """(tar.gz, extracted cifar-10-batches-py folder, batches) with the official layout."""
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _batch(rng, n) for i in range(1, 6)}
    batches["test_batch"] = _batch(rng, n + 1)
    folder = root / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, d in batches.items():
        (folder / name).write_bytes(evil if evil and name == "data_batch_1" else pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    return archive, folder, batches


def _expected(batches: dict[str, dict], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[n][b"labels"] for n in names])
    return x, y


@pytest.mark.parametrize("form", ["archive", "folder", "parent"])
def test_cifar10_archive_and_folder(tmp_path: Path, form: str):
    archive, folder, batches = make_fake_cifar(tmp_path)
    src = {"archive": archive, "folder": folder, "parent": folder.parent}[form]
    out = tmp_path / "out"
    m = write_set(cifar10_source(src), out, shard_size=7, progress=False)
    assert m.name == "cifar10" and m.count == 20 and m.shape == (3, 32, 32) and len(m.shards) == 3
    assert m.num_classes == 10 and m.labels and m.class_names == tuple(f"c{i}" for i in range(10))
    x, y = _expected(batches, [f"data_batch_{i}" for i in range(1, 6)])
    manifest, got, labels = read_set(out / "cifar10")
    keys = sorted(got)
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), x)
    np.testing.assert_array_equal([labels[k] for k in keys], y)
    np.testing.assert_allclose(manifest["mean"], x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(manifest["std"], x.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-12)


def test_cifar10_test_split(tmp_path: Path):
    archive, _, batches = make_fake_cifar(tmp_path)
    m = write_set(cifar10_source(archive, "test"), tmp_path / "out", progress=False)
    assert m.name == "cifar10-test" and m.count == 5
    _, got, labels = read_set(tmp_path / "out" / "cifar10-test")
    x, y = _expected(batches, ["test_batch"])
    np.testing.assert_array_equal(np.stack([got[k] for k in sorted(got)]), x)
    np.testing.assert_array_equal([labels[k] for k in sorted(got)], y)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar10_malicious_pickle_refused(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    archive, folder, _ = make_fake_cifar(tmp_path, evil=evil)
    for src in (archive, folder):
        with pytest.raises(UserError, match="refusing to load global"):
            cifar10_source(src)
    assert not (tmp_path / "PWNED").exists()


def test_cifar10_bad_sources(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist") as e:
        cifar10_source(tmp_path / "nope.tar.gz")
    assert str(e.value) == f"--src {tmp_path / 'nope.tar.gz'} does not exist"
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(UserError) as e:
        cifar10_source(junk)
    assert str(e.value) == f"--src {junk} is not a tar archive (want cifar-10-python.tar.gz)"
    other = tmp_path / "other.tar.gz"
    (tmp_path / "readme.txt").write_text("hello")
    with tarfile.open(other, "w:gz") as tf:
        tf.add(tmp_path / "readme.txt", arcname="cifar-100-python/readme.txt")
    with pytest.raises(UserError, match="not a CIFAR-10 python archive") as e:
        cifar10_source(other)
    missing = ", ".join(f"data_batch_{i}" for i in range(1, 6))
    assert str(e.value) == f"--src {other}: not a CIFAR-10 python archive (missing {missing})"
    with pytest.raises(UserError) as e:
        cifar10_source(other, "test")
    assert str(e.value) == f"--src {other}: not a CIFAR-10 python archive (missing test_batch)"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UserError, match="no CIFAR-10") as e:
        cifar10_source(empty)
    assert str(e.value) == f"--src {empty}: no CIFAR-10 python batches (data_batch_1..5, test_batch) found"


def test_cifar10_bad_split_and_truncated_archive(tmp_path: Path):
    archive, _, _ = make_fake_cifar(tmp_path)
    with pytest.raises(UserError) as e:
        cifar10_source(archive, "val")
    assert str(e.value) == "--split must be train or test, not 'val'"
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])  # still starts like a tar.gz; the gzip stream ends early
    with pytest.raises(UserError) as e:
        cifar10_source(cut)
    msg = str(e.value)
    assert msg.startswith(f"{cut}: cannot read the CIFAR-10 archive (EOFError: ") and "\n" not in msg, msg


def _pickled(d) -> bytes:
    return pickle.dumps(d, protocol=2)


_DATA = np.zeros((2, 3072), dtype=np.uint8)


@pytest.mark.parametrize("batch,problem", [
    (_pickled([1, 2]), "not a dict"),
    (_pickled({b"labels": [0, 1]}), "data must be uint8 [n, 3072]"),
    (_pickled({b"data": _DATA.astype(np.float64), b"labels": [0, 1]}), "data must be uint8 [n, 3072]"),
    (_pickled({b"data": _DATA[:, :3000], b"labels": [0, 1]}), "data must be uint8 [n, 3072]"),
    (_pickled({b"data": _DATA, b"labels": [0, 10]}), "labels must be n ints in 0..9"),
    (_pickled({b"data": _DATA, b"labels": [-1, 0]}), "labels must be n ints in 0..9"),
    (_pickled({b"data": _DATA, b"labels": [0]}), "labels must be n ints in 0..9"),
    (_pickled({b"data": _DATA, b"labels": "ab"}), "labels must be n ints in 0..9"),
    (b"\x00garbage", "UnpicklingError: "),
], ids=["not_a_dict", "no_data", "float_data", "short_rows", "label_10", "label_negative", "labels_short", "labels_str",
        "not_a_pickle"])
def test_cifar10_bad_batch_names_the_batch_and_the_problem(tmp_path: Path, batch: bytes, problem: str):
    archive, folder, _ = make_fake_cifar(tmp_path, evil=batch)  # data_batch_1 replaced
    for src in (archive, folder):
        with pytest.raises(UserError) as e:
            cifar10_source(src)
        msg = str(e.value)
        assert msg.startswith(f"{src}:data_batch_1: not a CIFAR-10 python batch ({problem}"), msg
        assert "\n" not in msg
