"""What the reader checks per sample: the PNG mode against the manifest's channels, the first sample at
open time, and the per-sample sha256 member."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from scm_graph.data.source import Source, array_source
from scm_graph.data.stream import open_shards, read_all
from scm_graph.data.writer import write_set
from scm_graph.spec import DataSpec
from tests.data.setfiles import digest
from tests.helpers import one_line_error

Members = list[tuple[str, bytes]]


def _small_set(root: Path, channels: int = 1, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """`root/small`: n random channels x 8 x 8 images, labels 0..4, 8 per shard (3 shards); returns (images, labels)."""
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, size=(n, channels, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 5
    write_set(array_source("small", "test", images, labels, tuple("abcde")), root, shard_size=8, progress=False)
    return images, labels


def _spec(root: Path) -> DataSpec:
    return DataSpec(name="small", root=str(root))


def _edit_manifest(root: Path, **fields) -> None:
    path = root / "small" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _edit_shard(root: Path, index: int, edit: Callable[[Members], Members]) -> Path:
    """Rewrite shard `index` as edit(its (member name, bytes) list); the manifest's shard_bytes follow."""
    path = root / "small" / f"shard-{index:06d}.tar"
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w") as tf:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sizes = json.loads((root / "small" / "manifest.json").read_text())["shard_bytes"]
    sizes[index] = path.stat().st_size
    _edit_manifest(root, shard_bytes=sizes)
    return path


def _set_member(key: str, ext: str, data: bytes | None, rehash: bool) -> Callable[[Members], Members]:
    """An edit that replaces (or with None drops) member `key.ext`, and recomputes that sample's sha256 if rehash."""

    def edit(members: Members) -> Members:
        out = [(n, data if n == f"{key}.{ext}" else d) for n, d in members]
        out = [(n, d) for n, d in out if d is not None]
        if rehash:
            payloads = {n.split(".", 1)[1]: d for n, d in out if n.startswith(key + ".") and not n.endswith(".sha256")}
            out = [(n, digest(payloads).encode() if n == f"{key}.sha256" else d) for n, d in out]
        return out

    return edit


def _png(mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- PNG mode vs channels


def test_grayscale_data_declared_rgb_fails_at_open(tmp_path: Path):
    """A manifest that says 3 channels over grayscale PNGs used to train silently as RGB."""
    _small_set(tmp_path, channels=1)
    _edit_manifest(tmp_path, shape=[3, 8, 8], mean=[1.0] * 3, std=[2.0] * 3)
    shard = tmp_path / "small" / "shard-000000.tar"
    assert one_line_error(open_shards, _spec(tmp_path)) == (
        f"shard file {shard}: sample 00000000 is a png of mode L, but the manifest says 3 channels (mode RGB)")


def test_rgb_data_declared_grayscale_fails_at_open(tmp_path: Path):
    _small_set(tmp_path, channels=3)
    _edit_manifest(tmp_path, shape=[1, 8, 8], mean=[1.0], std=[2.0])
    shard = tmp_path / "small" / "shard-000000.tar"
    assert one_line_error(open_shards, _spec(tmp_path)) == (
        f"shard file {shard}: sample 00000000 is a png of mode RGB, but the manifest says 1 channel (mode L)")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "1", "LA"])
def test_other_png_modes_are_refused(tmp_path: Path, channels: int, mode: str):
    """A foreign PNG of any other mode (with a valid checksum) is an error naming the mode and the expected one."""
    _small_set(tmp_path, channels=channels)
    shard = _edit_shard(tmp_path, 1, _set_member("00000010", "png", _png(mode), rehash=True))
    open_shards(_spec(tmp_path))  # the first shard is fine
    want = "L" if channels == 1 else "RGB"
    msg = one_line_error(lambda: list(read_all(_spec(tmp_path))))
    assert msg == (f"shard file {shard}: sample 00000010 is a png of mode {mode}, but the manifest says "
                   f"{channels} channel{'s' if channels > 1 else ''} (mode {want})")


# ----------------------------------------------------------------------------- first sample at open


@pytest.mark.parametrize("fields,problem", [
    (dict(shape=[1, 8, 9]), "is 8x8, manifest says 9x8"),
    (dict(shape=[1, 16, 8]), "is 8x8, manifest says 8x16"),
    (dict(labels=False, num_classes=0, class_names=None),
     "has a label (cls member), but the manifest says the set is unlabelled"),
])
def test_open_checks_the_first_sample_against_the_manifest(tmp_path: Path, fields: dict, problem: str):
    _small_set(tmp_path)
    _edit_manifest(tmp_path, **fields)
    shard = tmp_path / "small" / "shard-000000.tar"
    assert one_line_error(open_shards, _spec(tmp_path)) == f"shard file {shard}: sample 00000000 {problem}"


def test_open_checks_labels_of_an_unlabelled_manifest_over_labelled_data(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    write_set(Source("small", "test", (1, 8, 8), 10, None, ((x, None) for x in images)), tmp_path, progress=False)
    open_shards(_spec(tmp_path))
    _edit_manifest(tmp_path, labels=True, num_classes=3, class_names=["a", "b", "c"])
    shard = tmp_path / "small" / "shard-000000.tar"
    assert one_line_error(open_shards, _spec(tmp_path)) == (
        f"shard file {shard}: sample 00000000 has no label (cls member), but the manifest says the set is labelled")


def test_open_refuses_an_empty_first_shard(tmp_path: Path):
    _small_set(tmp_path)
    shard = _edit_shard(tmp_path, 0, lambda members: [])
    msg = one_line_error(open_shards, _spec(tmp_path))
    assert msg.startswith(f"shard file {shard} holds no samples; run `python -m scm_graph.shard"), msg


# ----------------------------------------------------------------------------- per-sample checksum


def test_set_reads_back_exactly(tmp_path: Path):
    images, labels = _small_set(tmp_path, channels=3)
    got = list(read_all(_spec(tmp_path)))
    assert [lab for _, lab in got] == labels.tolist()
    np.testing.assert_array_equal(np.stack([np.frombuffer(b, np.uint8).reshape(3, 8, 8) for b, _ in got]), images)


def test_changed_label_fails_the_checksum(tmp_path: Path):
    """A valid but different label in sample 12: with the checksum an error, without it (an older set) silent."""
    _, labels = _small_set(tmp_path)
    assert labels[12] != 4
    shard = _edit_shard(tmp_path, 1, _set_member("00000012", "cls", b"4", rehash=False))
    assert one_line_error(lambda: list(read_all(_spec(tmp_path)))) == (
        f"shard file {shard}: sample 00000012 does not match its sha256 checksum (corrupt data)")
    _edit_manifest(tmp_path, sample_checksum=None)  # what an older set gives: no check
    assert [lab for _, lab in read_all(_spec(tmp_path))][12] == 4


def test_changed_png_fails_the_checksum(tmp_path: Path):
    _small_set(tmp_path)
    shard = _edit_shard(tmp_path, 2, _set_member("00000017", "png", _png("L"), rehash=False))
    assert one_line_error(lambda: list(read_all(_spec(tmp_path)))) == (
        f"shard file {shard}: sample 00000017 does not match its sha256 checksum (corrupt data)")


def test_extra_member_fails_the_checksum(tmp_path: Path):
    _small_set(tmp_path)
    shard = _edit_shard(tmp_path, 0, lambda m: m[:3] + [("00000001.txt", b"hello")] + m[3:])
    assert [n for n, _ in _members(shard)][:4] == ["00000000.cls", "00000000.png", "00000000.sha256", "00000001.txt"]
    assert one_line_error(lambda: list(read_all(_spec(tmp_path)))) == (
        f"shard file {shard}: sample 00000001 does not match its sha256 checksum (corrupt data)")


@pytest.mark.parametrize("key", ["00000000", "00000005"])
def test_missing_checksum_member(tmp_path: Path, key: str):
    """Sample 0 fails at open, sample 5 (same shard) while reading."""
    _small_set(tmp_path)
    shard = _edit_shard(tmp_path, 0, _set_member(key, "sha256", None, rehash=False))
    expected = f"shard file {shard}: sample {key} has no sha256 member, but the manifest says every sample has one"
    if key == "00000000":
        assert one_line_error(open_shards, _spec(tmp_path)) == expected
    else:
        open_shards(_spec(tmp_path))
        assert one_line_error(lambda: list(read_all(_spec(tmp_path)))) == expected


def _members(shard: Path) -> Members:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def test_bad_tar_header_mid_shard_is_an_error_without_counts(tmp_path: Path):
    """tarfile ends quietly at a header whose checksum fails; the reader says so even for a set without shard_counts."""
    _small_set(tmp_path)
    d = json.loads((tmp_path / "small" / "manifest.json").read_text())
    for k in ("shard_counts", "shard_bytes", "sample_checksum"):
        d.pop(k)
    (tmp_path / "small" / "manifest.json").write_text(json.dumps(d))
    shard = tmp_path / "small" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        offset = next(m.offset for m in tf if m.name == "00000013.cls")
    data[offset] ^= 0x01  # the first letter of the member name: the header checksum no longer matches
    shard.write_bytes(bytes(data))
    open_shards(_spec(tmp_path))
    assert one_line_error(lambda: list(read_all(_spec(tmp_path)))) == (
        f"shard file {shard} is truncated or corrupt (bad tar header at byte {offset})")
