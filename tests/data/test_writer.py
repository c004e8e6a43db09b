"""Shard writer: digits/cifar10/folder sources, manifest fields, bit-exact round trip, safety, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scm_graph.data.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.shard import digits_source, main, write_set
from tests.helpers import read_set, snapshot


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











