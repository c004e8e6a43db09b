"""Shard writer: digits/cifar10/folder sources, manifest fields, bit-exact round trip, safety, CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from scm_graph.data.digits import load_digits_uint8
from scm_graph.data.source import Source
from scm_graph.errors import UserError
from scm_graph.shard import digits_source, main, write_set
from tests.data.setfiles import digest, read_members, read_set
from tests.helpers import snapshot


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













def _digits(n: int):
    images, labels = load_digits_uint8()
    return images[:n], labels[:n]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path: Path):
    """The second shard file is a link to /dev/full (every write: ENOSPC); the temp folder is removed."""
    images, labels = _digits(3)
    out = tmp_path / "out"

    def samples():
        for i in range(3):
            if i == 1:  # the first shard is written; the writer is about to open the second
                (tmp,) = out.glob(".digits.tmp-*")
                (tmp / "shard-000001.tar").symlink_to("/dev/full")
            yield images[i], int(labels[i])

    source = Source("digits", "test", (1, 8, 8), 3, tuple("0123456789"), samples())
    with pytest.raises(UserError) as e:
        write_set(source, out, shard_size=1, progress=False)
    msg = str(e.value)
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}/\.digits\.tmp-[^/]+/shard-000001\.tar: No space left on device",
                        msg), msg
    assert list(out.iterdir()) == []


def test_constant_channel_is_refused(tmp_path: Path):
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    images[:, 0] = np.arange(4)[:, None, None]  # channel 0 varies, 1 and 2 do not
    source = Source("flat", "test", (3, 8, 8), 4, None, ((x, None) for x in images))
    with pytest.raises(UserError) as e:
        write_set(source, tmp_path, progress=False)
    assert str(e.value) == "channel 1 of the source is constant (std 0.0); it cannot be normalised"
    assert list(tmp_path.iterdir()) == []


def test_every_sample_carries_its_checksum(digits_dir: Path):
    m = json.loads((digits_dir / "manifest.json").read_text())
    assert m["sample_checksum"] == "sha256"
    members = read_members(digits_dir)
    assert len(members) == 1797
    for key, payloads in members.items():
        assert sorted(payloads) == ["cls", "png", "sha256"], key
        stored = payloads.pop("sha256").decode()
        assert re.fullmatch(r"[0-9a-f]{16}", stored) and stored == digest(payloads), key
