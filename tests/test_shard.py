"""Shard writer: digits/cifar10/folder sources, manifest fields, bit-exact round trip, safety, CLI."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scm_graph.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.shard import cifar10_source, digits_source, folder_source, main, write_set


def read_set(folder: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(manifest json, key -> uint8 CHW image, key -> label) read with tarfile + PIL only."""
    manifest = json.loads((folder / "manifest.json").read_text())
    images: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                if ext == "png":
                    arr = np.asarray(Image.open(io.BytesIO(data)))
                    images[key] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
                else:
                    assert ext == "cls"
                    labels[key] = int(data.decode("ascii"))
    return manifest, images, labels


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_set(digits_source(), out, shard_size=500, progress=False)
    return out / "digits"


def test_digits_manifest_fields(digits_dir: Path):
    images, _ = load_digits_uint8()
    m = json.loads((digits_dir / "manifest.json").read_text())
    assert m["version"] == 1
    assert m["name"] == "digits" and m["count"] == 1797 and m["shape"] == [1, 8, 8]
    assert m["dtype"] == "uint8" and m["format"] == "png"
    assert m["labels"] is True and m["num_classes"] == 10
    assert m["class_names"] == [str(i) for i in range(10)]
    assert m["source"] == "sklearn.datasets.load_digits"
    assert m["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in digits_dir.iterdir()) == sorted(m["shards"] + ["manifest.json"])
    x = images.astype(np.float64)
    np.testing.assert_allclose(m["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m["std"], x.std(axis=(0, 2, 3)), rtol=1e-12)


def test_digits_round_trip_bit_exact(digits_dir: Path):
    images, labels = load_digits_uint8()
    _, got, got_labels = read_set(digits_dir)
    assert len(got) == 1797 and len(got_labels) == 1797
    keys = sorted(got)
    assert keys == [f"{i:08d}" for i in range(1797)]
    stacked = np.stack([got[k] for k in keys])
    assert stacked.dtype == np.uint8 and stacked.shape == images.shape
    np.testing.assert_array_equal(stacked, images)
    np.testing.assert_array_equal([got_labels[k] for k in keys], labels)


def test_refuses_overwrite_without_force_and_force_replaces(tmp_path: Path):
    write_set(digits_source(), tmp_path, shard_size=1000, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="already exists.*--force"):
        write_set(digits_source(), tmp_path, shard_size=300, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["digits", "--out", str(tmp_path), "--shard-size", "300"])
    assert e.value.code == 2
    assert snapshot(tmp_path) == before

    m = write_set(digits_source(), tmp_path, shard_size=300, force=True, progress=False)
    assert len(m.shards) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temp/old folders left
    manifest, got, _ = read_set(tmp_path / "digits")
    assert len(manifest["shards"]) == 6 and len(got) == 1797


# ----------------------------------------------------------------------------- cifar10


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
    with pytest.raises(UserError, match="does not exist"):
        cifar10_source(tmp_path / "nope.tar.gz")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(UserError):
        cifar10_source(junk)
    other = tmp_path / "other.tar.gz"
    (tmp_path / "readme.txt").write_text("hello")
    with tarfile.open(other, "w:gz") as tf:
        tf.add(tmp_path / "readme.txt", arcname="cifar-100-python/readme.txt")
    with pytest.raises(UserError, match="not a CIFAR-10 python archive"):
        cifar10_source(other)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UserError, match="no CIFAR-10"):
        cifar10_source(empty)


# ----------------------------------------------------------------------------- folder


def _png(path: Path, w: int, h: int, seed: int, fmt: str = "PNG") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def test_folder_with_class_subfolders(tmp_path: Path):
    src = tmp_path / "pets"
    src.joinpath("dog").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(src / "dog" / "a.png")
    _png(src / "dog" / "deep" / "b.jpg", 20, 50, 1, "JPEG")
    _png(src / "cat" / "c.png", 16, 16, 2)
    _png(src / "cat" / "d.bmp", 9, 13, 3, "BMP")
    _png(src / "bird" / "e.webp", 64, 17, 4, "WEBP")
    (src / "cat" / "notes.txt").write_text("not an image")
    m = write_set(folder_source(src, 16), tmp_path / "out", shard_size=2, progress=False)
    assert m.name == "pets" and m.count == 5 and m.shape == (3, 16, 16) and len(m.shards) == 3
    assert m.labels and m.num_classes == 3 and m.class_names == ("bird", "cat", "dog")
    manifest, got, labels = read_set(tmp_path / "out" / "pets")
    assert manifest["source"] == str(src.resolve())
    keys = sorted(got)
    assert all(got[k].shape == (3, 16, 16) for k in keys)
    assert sorted(labels[k] for k in keys) == [0, 1, 1, 2, 2]
    # the image already at R x R is stored unchanged, with its class; a uniform image stays uniform
    c_png = np.asarray(Image.open(src / "cat" / "c.png")).transpose(2, 0, 1)
    (k_c,) = [k for k in keys if np.array_equal(got[k], c_png)]
    assert labels[k_c] == 1
    (k_flat,) = [k for k in keys if (got[k] == got[k][:, :1, :1]).all()]
    assert labels[k_flat] == 2 and got[k_flat][:, 0, 0].tolist() == [10, 200, 30]


def test_folder_unlabelled(tmp_path: Path):
    src = tmp_path / "flat"
    _png(src / "a.png", 30, 20, 0)
    _png(src / "b.png", 8, 8, 1)
    m = write_set(folder_source(src, 8), tmp_path / "out", progress=False)
    assert not m.labels and m.num_classes == 0 and m.class_names is None
    _, got, labels = read_set(tmp_path / "out" / "flat")
    assert len(got) == 2 and labels == {}
    nested = tmp_path / "nested"
    _png(nested / "x" / "a.png", 8, 8, 0)
    m = write_set(folder_source(nested, 8, labels=False), tmp_path / "out", progress=False)
    assert not m.labels and m.class_names is None


def test_folder_bad_sources(tmp_path: Path):
    with pytest.raises(UserError, match="not a folder"):
        folder_source(tmp_path / "missing", 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        folder_source(tmp_path / "empty", 8)
    src = tmp_path / "broken"
    _png(src / "a" / "ok.png", 8, 8, 0)
    (src / "b").mkdir()
    (src / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="bad.png"):
        write_set(folder_source(src, 8), out, progress=False)
    assert list(out.iterdir()) == []  # the temp folder is gone, nothing half-written


def test_main_missing_src_is_one_line(tmp_path: Path, capsys):
    for argv in (["cifar10", "--out", str(tmp_path)], ["folder", "--src", str(tmp_path / "x"), "--resolution", "8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_subprocess_digits(tmp_path: Path):
    ok = subprocess.run(
        [sys.executable, "-m", "scm_graph.shard", "digits", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "1797" in ok.stdout
    assert json.loads((tmp_path / "digits" / "manifest.json").read_text())["count"] == 1797


def test_cli_subprocess_bad_source_is_one_line(tmp_path: Path):
    bad = subprocess.run(
        [sys.executable, "-m", "scm_graph.shard", "cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), bad.stderr


def test_folder_jobs_match_single_process(tmp_path: Path):
    src = tmp_path / "imgs"
    for i in range(6):
        _png(src / f"c{i % 2}" / f"{i}.png", 20 + i, 12 + 3 * i, i)
    one = write_set(folder_source(src, 8), tmp_path / "a", progress=False)
    two = write_set(folder_source(src, 8, jobs=2), tmp_path / "b", progress=False)
    assert one == two
    (src / "c0" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.png"):
        write_set(folder_source(src, 8, jobs=2), tmp_path / "c", progress=False)
