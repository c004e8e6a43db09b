"""Image-folder source: class sub-folders, unlabelled folders, resize and crop, bad inputs, parallel decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scm_graph.data.folder import folder_source
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from tests.helpers import read_set


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
