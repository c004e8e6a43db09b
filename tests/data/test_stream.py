"""The batch stream: deterministic and resumable, worker-count independent, channel normalisation end to end, corrupt shards."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from scm_graph.data import tarindex
from scm_graph.data.digits import digits_source, load_digits_uint8
from scm_graph.data.manifest import Manifest, resolve_spec
from scm_graph.data.normalize import denormalize
from scm_graph.data.source import Source
from scm_graph.data.stream import Batch, batches
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from scm_graph.spec import DataSpec, NetSpec, Spec


def dspec(root: Path, **kw) -> DataSpec:
    kw.setdefault("shuffle_buffer", 200)
    return DataSpec(name=kw.pop("name", "digits"), root=str(root), **kw)


def take(spec: DataSpec, n: int, batch: int = 32, seed: int = 0, **kw) -> list[Batch]:
    return list(islice(batches(spec, 0.5, batch, seed, **kw), n))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.x0, y.x0) and (x.label is None and y.label is None or torch.equal(x.label, y.label))
        for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------- stream


def test_batches_shape_dtype_and_pairs(root: Path):
    images, labels = load_digits_uint8()
    known = {(images[i].tobytes(), int(labels[i])) for i in range(len(images))}
    spec = dspec(root)
    for b in take(spec, 8):
        assert b.x0.shape == (32, 1, 8, 8) and b.x0.dtype == torch.float32
        assert b.label is not None and b.label.dtype == torch.int64 and b.label.shape == (32,)
        assert b.x0.min() >= -1 and b.x0.max() <= 1
        px = denormalize(b.x0, spec, 0.5).round().to(torch.uint8).numpy()
        assert all((px[i].tobytes(), int(b.label[i])) in known for i in range(32))


def test_determinism_seeds_and_ranks(root: Path):
    spec = dspec(root)
    a = take(spec, 6)
    assert same(a, take(spec, 6))
    assert not same(a, take(spec, 6, seed=1))
    r1 = take(spec, 6, rank=1, world_size=2)
    assert not same(a, r1)
    assert same(r1, take(spec, 6, rank=1, world_size=2))


@pytest.mark.parametrize("segment_images", [1 << 20, 100])
def test_resume_equals_uninterrupted(root: Path, segment_images: int):
    spec = dspec(root, segment_images=segment_images)
    full = take(spec, 12, batch=32)
    # 96 ends segment 0 exactly (at 100 it does not); 128 starts inside segment 1; 320 = 3 segments + 20
    for k in (32, 96, 128, 320):
        assert same(take(spec, 12 - k // 32, batch=32, start_images=k), full[k // 32 :]), k


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more than this CPU's 2 cores
def test_workers_give_the_same_stream(root: Path):
    """Workers decode chunks of stream.CHUNK (64) samples in turn: a segment of 150 is chunks of 64, 64 and 22;
    one of 100 leaves the third of 3 workers without a chunk."""
    for segment, workers in ((150, 2), (150, 3), (100, 3)):
        spec = dspec(root, segment_images=segment)
        ref = take(spec, 8, batch=32)
        with_workers = dataclasses.replace(spec, workers=workers)
        assert same(take(with_workers, 8, batch=32), ref), (segment, workers)
        assert same(take(with_workers, 4, batch=32, start_images=128), ref[4:]), (segment, workers)


def test_unlabelled_set_gives_none(tmp_path: Path):
    images, _ = load_digits_uint8()
    src = Source("plain", "test", (1, 8, 8), 50, None, ((images[i], None) for i in range(50)))
    write_set(src, tmp_path, progress=False)
    (b,) = take(dspec(tmp_path, name="plain"), 1, batch=16)
    assert b.label is None and b.x0.shape == (16, 1, 8, 8)


def test_bad_stream_arguments(root: Path):
    with pytest.raises(UserError) as e:
        next(batches(dspec(root), 0.5, 0, 0))
    assert str(e.value) == "batch must be positive, not 0"
    with pytest.raises(UserError) as e:
        next(batches(dspec(root), 0.5, 8, 0, rank=2, world_size=2))
    assert str(e.value) == "rank 2 is outside world_size 2"


@pytest.mark.parametrize("kw,message", [
    (dict(batch=-3), "batch must be positive, not -3"),
    (dict(start_images=-1), "start_images must be >= 0, not -1"),
    (dict(rank=-1), "rank -1 is outside world_size 1"),
    (dict(rank=0, world_size=0), "rank 0 is outside world_size 0"),
])
def test_bad_stream_arguments_name_the_values(root: Path, kw: dict, message: str):
    args = {"batch": 8, "start_images": 0, "rank": 0, "world_size": 1, **kw}
    with pytest.raises(UserError) as e:
        next(batches(dspec(root), 0.5, args.pop("batch"), 0, **args))
    assert str(e.value) == message


@pytest.mark.parametrize("field,value,message", [
    ("segment_images", 0, "data.segment_images must be positive, not 0"),
    ("segment_images", -4, "data.segment_images must be positive, not -4"),
    ("shuffle_buffer", -1, "data.shuffle_buffer must be >= 0, not -1"),
    ("workers", -2, "data.workers must be >= 0, not -2"),
])
def test_bad_stream_settings_name_the_field_and_value(root: Path, field: str, value: int, message: str):
    with pytest.raises(UserError) as e:
        next(batches(dspec(root, **{field: value}), 0.5, 8, 0))
    assert str(e.value) == message


# ----------------------------------------------------------------------------- corrupt shards


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # mid-member, not on a tar block boundary


def _forget_sizes(folder: Path, checksum: bool = True) -> None:
    """Drop the optional per-shard checks (and the per-sample checksum) from the manifest, as a foreign writer would."""
    d = json.loads((folder / "manifest.json").read_text())
    d.pop("shard_bytes")
    d.pop("shard_counts")
    if checksum:
        d.pop("sample_checksum")
    (folder / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("sizes_in_manifest", [True, False])
def test_truncated_shard_is_user_error(tmp_path: Path, sizes_in_manifest: bool):
    write_set(digits_source(), tmp_path, shard_size=1000, progress=False)
    shard = tmp_path / "digits" / "shard-000001.tar"
    _truncate(shard)
    if not sizes_in_manifest:
        _forget_sizes(tmp_path / "digits", checksum=False)
    size, listed = shard.stat().st_size, json.loads((tmp_path / "digits" / "manifest.json").read_text()).get("shard_bytes")
    with pytest.raises(UserError) as e:
        take(dspec(tmp_path, shuffle_buffer=10), 200, batch=64)
    msg = str(e.value)
    assert str(shard) in msg and "truncated or corrupt" in msg and "\n" not in msg
    problem = f"{size} bytes, manifest says {listed[1]}" if sizes_in_manifest else "no end-of-archive marker"
    assert msg == (f"shard file {shard} is truncated or corrupt ({problem}); "
                   f"run `python -m scm_graph.shard digits --out {tmp_path} --force`")


def test_shard_with_fewer_samples_than_listed(tmp_path: Path):
    """A shard cut between members and re-terminated looks like a valid tar; the counts catch it."""
    write_set(digits_source(), tmp_path, shard_size=1000, progress=False)
    shard = tmp_path / "digits" / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        cut = next(m.offset for m in tf if m.name.startswith("00000250."))
    shard.write_bytes(shard.read_bytes()[:cut] + bytes(10240))  # 250 whole samples + end marker
    d = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    d.pop("shard_bytes")
    (tmp_path / "digits" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*250 samples, manifest says 1000"):
        take(dspec(tmp_path, shuffle_buffer=10), 200, batch=64)


@pytest.mark.parametrize("workers,cache", [(0, True), (2, True), (2, False)])
def test_bad_header_mid_shard_is_one_line_with_workers(tmp_path: Path, workers: int, cache: bool, monkeypatch):
    """A bad header found by the main process (indexing before the workers fork) or, with the index cache off,
    inside a DataLoader worker: one line naming the shard either way, never a worker's traceback."""
    if not cache:
        monkeypatch.setattr(tarindex, "CACHE_SAMPLES", 0)
    write_set(digits_source(), tmp_path, shard_size=700, progress=False)
    folder = tmp_path / "digits"
    shard = folder / "shard-000001.tar"  # samples 700..1399
    with tarfile.open(shard) as tf:
        at = next(m.offset for m in tf if m.name.startswith("00001200."))
    data = bytearray(shard.read_bytes())
    data[at:at + 100] = b"\xff" * 100  # a header no tar reader accepts; the size stays the same
    shard.write_bytes(bytes(data))
    _forget_sizes(folder, checksum=False)
    with pytest.raises(UserError) as e:
        take(dspec(tmp_path, shuffle_buffer=50, workers=workers, segment_images=700), 300, batch=32)
    assert str(e.value).startswith(f"shard file {shard} is truncated or corrupt (bad tar header at byte {at}")
    assert "\n" not in str(e.value)


def test_workers_fork_from_indexed_shards(root: Path, monkeypatch):
    """With workers, the main process indexes every shard first (the workers inherit the indexes)."""
    monkeypatch.setattr(tarindex, "_cache", type(tarindex._cache)())
    m = Manifest.load(root / "digits")
    take(dspec(root, workers=2, segment_images=150), 1, batch=32)
    assert len(tarindex._cache) == len(m.shards) > 1


def test_unparseable_shard_names_the_file(tmp_path: Path):
    write_set(digits_source(), tmp_path, shard_size=2000, progress=False)
    folder = tmp_path / "digits"
    shard = folder / "shard-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        for _ in range(2):  # the same key twice in a row: webdataset refuses the duplicate file
            w.write({"__key__": "00000000", "png": b"x", "cls": b"1"})
    _forget_sizes(folder)
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*truncated or corrupt.*duplicate"):
        take(dspec(tmp_path), 1, batch=8)


def test_corrupt_png_names_the_shard(tmp_path: Path):
    write_set(digits_source(), tmp_path, shard_size=2000, progress=False)
    folder = tmp_path / "digits"
    shard = folder / "shard-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i in range(1797):
            w.write({"__key__": f"{i:08d}", "png": b"\x89PNG\r\n\x1a\nbroken", "cls": b"1"})
    _forget_sizes(folder)
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*bad png") as e:
        take(dspec(tmp_path), 1, batch=8)
    assert str(e.value) == f"shard file {shard}: sample 00000000 has a bad png (not a PNG image)"
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*bad png") as e:
        take(dspec(tmp_path, workers=1), 1, batch=8)
    assert str(e.value) == f"shard file {shard}: sample 00000000 has a bad png (not a PNG image)"


def _rewrite_shard(tmp_path: Path, sample) -> Path:
    """The digits as one shard, rewritten so that every sample is `sample(i)` (a dict of raw bytes)."""
    write_set(digits_source(), tmp_path, shard_size=2000, progress=False)
    folder = tmp_path / "digits"
    shard = folder / "shard-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i in range(1797):
            w.write({"__key__": f"{i:08d}", **sample(i)})
    _forget_sizes(folder)
    return shard


def _png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 7).save(buf, format="PNG")
    return buf.getvalue()


def test_cut_png_gives_the_decoder_reason_in_words(tmp_path: Path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()[:60]  # the signature, IHDR and the start of IDAT
    shard = _rewrite_shard(tmp_path, lambda i: {"png": png, "cls": b"1"})
    with pytest.raises(UserError) as e:
        take(dspec(tmp_path), 1, batch=8)
    assert str(e.value) == f"shard file {shard}: sample 00000000 has a bad png (image file is truncated)"


def test_wrong_image_size_names_the_sizes(tmp_path: Path):
    png = _png_bytes(4, 8)  # 4 wide, 8 high; the manifest says 8x8
    shard = _rewrite_shard(tmp_path, lambda i: {"png": png, "cls": b"1"})
    with pytest.raises(UserError) as e:
        take(dspec(tmp_path), 1, batch=8)
    assert re.fullmatch(rf"shard file {re.escape(str(shard))}: sample \d{{8}} is 4x8, manifest says 8x8", str(e.value)), str(e.value)


@pytest.mark.parametrize("cls,problem", [
    (b"10", "has label '10', expected an integer in 0..9"),
    (b"-1", "has label '-1', expected an integer in 0..9"),
    (b"x", "has label 'x', expected an integer in 0..9"),
    (b" 3", "has label ' 3', expected an integer in 0..9"),
    (b"3_0", "has label '3_0', expected an integer in 0..9"),
    (None, "has no label (cls member), but the manifest says the set is labelled"),
])
def test_bad_label_names_the_sample_and_value(tmp_path: Path, cls: bytes | None, problem: str):
    png = _png_bytes(8, 8)
    shard = _rewrite_shard(tmp_path, lambda i: {"png": png, **({} if cls is None else {"cls": cls})})
    with pytest.raises(UserError) as e:
        take(dspec(tmp_path), 1, batch=8)
    assert str(e.value) == f"shard file {shard}: sample 00000000 {problem}"


def _rgb_set(root: Path) -> Manifest:
    """300 random 3x8x8 images whose channels have different means and spreads."""
    rng = np.random.default_rng(0)
    lo, hi = np.array([0, 100, 200]), np.array([255, 180, 230])
    x = (lo[None, :, None, None] + rng.random((300, 3, 8, 8)) * (hi - lo)[None, :, None, None]).astype(np.uint8)
    write_set(Source("rgb", "test", (3, 8, 8), 300, None, ((x[i], None) for i in range(300))), root, progress=False)
    return Manifest.load(root / "rgb")


def test_channel_normalisation_stats(tmp_path: Path):
    m = _rgb_set(tmp_path)
    spec = resolve_spec(Spec(data=dspec(tmp_path, name="rgb", normalize="channel")), m).data
    assert spec.channels == 3 and len(spec.mean) == 3
    x = torch.cat([b.x0 for b in take(spec, 30, batch=64)]).double()
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=0.03), mean
    assert torch.allclose(std, torch.full((3,), 0.5, dtype=torch.float64), rtol=0.03), std


def test_spec_with_fewer_classes_than_the_shards_is_one_error(tmp_path: Path):
    """A class-conditional spec whose data.num_classes is below the shards' would leave the extra labels without an
    embedding row (the one-hot gives them zeros): one line, before training."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    write_set(Source("lab", "test", (1, 8, 8), 12, ("a", "b", "c"), ((x[i], i % 3) for i in range(12))), tmp_path, progress=False)
    m = Manifest.load(tmp_path / "lab")
    net = NetSpec(class_conditional=True)
    with pytest.raises(UserError, match="spec wants 2 classes but shards lab hold 3"):
        resolve_spec(Spec(data=dspec(tmp_path, name="lab", num_classes=2), net=net), m)
    for n in (0, 3, 5):  # from the shards, equal, or more rows than labels: fine
        assert resolve_spec(Spec(data=dspec(tmp_path, name="lab", num_classes=n), net=net), m).data.num_classes == (n or 3)
    assert resolve_spec(Spec(data=dspec(tmp_path, name="lab", num_classes=2)), m).data.num_classes == 2  # unconditional
