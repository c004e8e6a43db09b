"""Image-folder source: class sub-folders, unlabelled folders, resize and crop, bad inputs, parallel decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scm_graph.data.folder import folder_source
from scm_graph.data.source import skipped_summary
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from tests.data.setfiles import read_set


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


def test_folder_reads_gif_first_frame_and_tiff(tmp_path: Path):
    src = tmp_path / "anim"
    src.mkdir()
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(src / "a.gif", save_all=True, append_images=frames[1:])
    _png(src / "b.tif", 8, 8, 1, "TIFF")
    _png(src / "c.TIFF", 8, 8, 2, "TIFF")
    source = folder_source(src, 8)
    assert source.count == 3 and source.skipped == ()
    write_set(source, tmp_path / "out", progress=False)
    _, got, _ = read_set(tmp_path / "out" / "anim")
    reds = [k for k in got if (got[k][0] > 200).all() and (got[k][2] < 50).all()]
    assert len(reds) == 1  # the GIF's first (red) frame, not its blue second one
    tiffs = {np.asarray(Image.open(src / n)).transpose(2, 0, 1).tobytes() for n in ("b.tif", "c.TIFF")}
    assert tiffs <= {v.tobytes() for v in got.values()}


def test_folder_reports_what_it_skips(tmp_path: Path):
    src = tmp_path / "mixed"
    _png(src / "cat" / "a.png", 8, 8, 0)
    _png(src / "dog" / "b.png", 8, 8, 1)
    (src / "cat" / "notes.txt").write_text("x")
    (src / "dog" / "z.txt").write_text("x")
    (src / "dog" / "README").write_text("x")
    (src / "cat" / ".DS_Store").write_bytes(b"x")
    _png(src / ".cache" / "c.png", 8, 8, 2)  # an image, but in a hidden folder
    source = folder_source(src, 8)
    assert source.count == 2 and source.class_names == ("cat", "dog")
    assert source.skipped == (("hidden", ".cache/c.png"), ("hidden", "cat/.DS_Store"), (".txt", "cat/notes.txt"),
                              ("no extension", "dog/README"), (".txt", "dog/z.txt"))
    assert skipped_summary(source.skipped) == (
        "skipped 5 files: 2 .txt, 2 hidden, 1 no extension (.cache/c.png, cat/.DS_Store, cat/notes.txt, ...)")
    assert skipped_summary(source.skipped[2:3]) == "skipped 1 file: 1 .txt (cat/notes.txt)"
    assert skipped_summary(()) == ""
