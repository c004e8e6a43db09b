"""The batch stream on latent shard sets: posterior draws z = mean + std * eps with (seed, rank, first image)
seeding, resume, the mean when the posterior is off, channel normalisation, and one-line errors for bad samples."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from scm_graph.data.manifest import Manifest, resolve_spec
from scm_graph.data.stream import Batch, batches, read_all
from scm_graph.spec import DataSpec, Spec
from tests.data.latentsets import PAPER_MEAN, PAPER_STD, npy_bytes, write_latent_set
from tests.helpers import one_line_error

C, H, W = 4, 4, 4
N = 40
CLASSES = 5


def _posteriors(dtype: str = "float16", seed: int = 0) -> np.ndarray:
    """[N, 2C, h, w]: the means (a distinct offset per sample, so a row names its sample), then stds in (0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(N, C, H, W)) * 3 + np.arange(N)[:, None, None, None] * 0.25
    std = rng.uniform(0.5, 1.5, size=(N, C, H, W))
    return np.concatenate([mean, std], axis=1).astype(dtype)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """`lat16` (float16, mean and std), `lat32` (float32, mean and std) and `mean32` (float32, mean only)."""
    out = tmp_path_factory.mktemp("latents")
    labels = np.arange(N) % CLASSES
    write_latent_set(out, "lat16", _posteriors("float16"), labels, num_classes=CLASSES)
    write_latent_set(out, "lat32", _posteriors("float32", seed=1), labels, num_classes=CLASSES)
    write_latent_set(out, "mean32", _posteriors("float32", seed=2)[:, :C], labels, num_classes=CLASSES, stored="mean")
    return out


def identity(root: Path, name: str, **kw) -> DataSpec:
    """A spec whose channel normalisation is the identity (mean 0, std 1, used with sigma_d 1)."""
    kw.setdefault("shuffle_buffer", 16)
    return DataSpec(name=name, root=str(root), normalize="channel", mean=(0.0,) * C, std=(1.0,) * C, **kw)


def take(spec: DataSpec, n: int, batch: int = 8, seed: int = 0, sigma_d: float = 1.0, **kw) -> list[Batch]:
    return list(islice(batches(spec, sigma_d, batch, seed, **kw), n))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.x0, y.x0) and torch.equal(x.label, y.label) for x, y in zip(a, b))


def stored(root: Path, name: str) -> np.ndarray:
    """The set's arrays as float32, read back with np.load (samples in key order)."""
    import tarfile

    m = Manifest.load(root / name)
    rows = []
    for s in m.shards:
        with tarfile.open(root / name / s) as tf:
            rows += [np.load(io.BytesIO(tf.extractfile(x).read())) for x in tf if x.name.endswith(".npy")]
    return np.stack(rows).astype(np.float32)


def expected_seed(seed: int, rank: int, first: int) -> int:
    """The documented eps seed, computed again: sha256 of repr((seed, rank, first, "posterior")), 63 bits."""
    digest = hashlib.sha256(repr((seed, rank, first, "posterior")).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rows_of(means: torch.Tensor, arrays: np.ndarray) -> list[int]:
    """The sample index of each mean in a batch (each sample's mean is distinct)."""
    table = {arrays[i, :C].tobytes(): i for i in range(len(arrays))}
    return [table[m.numpy().tobytes()] for m in means]


# ----------------------------------------------------------------------------- posterior draws


@pytest.mark.parametrize("name", ["lat16", "lat32"])
@pytest.mark.parametrize("rank", [0, 1])
def test_draws_are_mean_plus_std_eps(root: Path, name: str, rank: int):
    arrays = stored(root, name)
    spec = identity(root, name)
    off = take(dataclasses.replace(spec, posterior=False), 5, seed=3, rank=rank, world_size=2)
    on = take(spec, 5, seed=3, rank=rank, world_size=2)
    for i, (a, b) in enumerate(zip(off, on)):
        idx = rows_of(a.x0, arrays)  # posterior off: every row is a stored mean, exactly
        assert torch.equal(a.label, b.label) and a.label.tolist() == [k % CLASSES for k in idx]
        eps = torch.randn((8, C, H, W), generator=torch.Generator().manual_seed(expected_seed(3, rank, 8 * i)))
        mean, std = torch.from_numpy(arrays[idx, :C]), torch.from_numpy(arrays[idx, C:])
        assert b.x0.dtype == torch.float32 and b.x0.shape == (8, C, H, W)
        assert torch.equal(b.x0, mean + std * eps), i


def test_draws_differ_by_seed_rank_and_batch(root: Path):
    spec = identity(root, "lat32")
    a = take(spec, 4)
    assert same(a, take(spec, 4))
    assert not same(a, take(spec, 4, seed=1))
    assert not same(take(spec, 4, rank=0, world_size=2), take(spec, 4, rank=1, world_size=2))


@pytest.mark.parametrize("segment_images", [1 << 20, 24])
def test_resume_equals_unbroken(root: Path, segment_images: int):
    spec = identity(root, "lat16", segment_images=segment_images)
    full = take(spec, 10)
    for k in (8, 24, 40, 56):  # 24 ends segment 0 when segments hold 24 images; 56 lies inside segment 2
        assert same(take(spec, 10 - k // 8, start_images=k), full[k // 8 :]), k


def test_workers_give_the_same_draws(root: Path):
    spec = identity(root, "lat16", segment_images=24)
    ref = take(spec, 6)
    assert same(take(dataclasses.replace(spec, workers=2), 6), ref)


def test_mean_only_set_gives_the_mean(root: Path):
    arrays = stored(root, "mean32")
    for posterior in (True, False):
        for b in take(identity(root, "mean32", posterior=posterior), 4):
            idx = rows_of(b.x0, arrays)
            assert torch.equal(b.x0, torch.from_numpy(arrays[idx]))


# ----------------------------------------------------------------------------- normalisation


def test_paper_constants(root: Path):
    raw = take(identity(root, "lat16"), 3, seed=5)
    spec = resolve_spec(Spec(data=DataSpec(name="lat16", root=str(root), normalize="channel", shuffle_buffer=16,
                                           mean=PAPER_MEAN, std=PAPER_STD)), Manifest.load(root / "lat16")).data
    assert spec.mean == PAPER_MEAN and spec.std == PAPER_STD
    mean, std = torch.tensor(PAPER_MEAN).view(C, 1, 1), torch.tensor(PAPER_STD).view(C, 1, 1)
    for a, b in zip(raw, take(spec, 3, seed=5, sigma_d=0.5)):
        torch.testing.assert_close(b.x0, (a.x0 - mean) / std * 0.5, rtol=1e-6, atol=1e-6)  # (z - mean) / std * sigma_d


def test_manifest_statistics(root: Path):
    m = Manifest.load(root / "lat32")
    spec = resolve_spec(Spec(data=DataSpec(name="lat32", root=str(root), normalize="channel", shuffle_buffer=16)), m).data
    assert spec.mean == m.mean and spec.std == m.std
    mean, std = torch.tensor(m.mean).view(C, 1, 1), torch.tensor(m.std).view(C, 1, 1)
    raw = take(identity(root, "lat32"), 3)
    for a, b in zip(raw, take(spec, 3, sigma_d=0.5)):
        torch.testing.assert_close(b.x0, (a.x0 - mean) / std * 0.5, rtol=1e-6, atol=1e-6)
    # the manifest's statistics are those of the draws: normalised latents have mean ~ 0 and std ~ sigma_d
    x = torch.cat([b.x0 for b in take(spec, 100, sigma_d=0.5)])  # 800 draws (whole shards of 8 are drawn at a time)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1 and (x.std(dim=(0, 2, 3)) - 0.5).abs().max() < 0.1


def test_pixel_normalisation_refused(root: Path):
    spec = dataclasses.replace(identity(root, "lat16"), normalize="pixel")
    msg = one_line_error(lambda: next(batches(spec, 0.5, 8, 0)))
    assert msg == "shards lat16 hold VAE latents: set data.normalize to 'channel' (per-channel mean / std)"


def test_read_all_refuses_a_latent_set(root: Path):
    msg = one_line_error(lambda: next(read_all(identity(root, "lat16"))))
    assert msg == f"shard set {root / 'lat16'} holds VAE latents; only pixel sets can be read as images"


# ----------------------------------------------------------------------------- bad samples


def _bad_set(tmp_path: Path, member: dict[str, bytes], index: int = 3, dtype: str = "float16") -> DataSpec:
    arrays = _posteriors(dtype)[:6]
    write_latent_set(tmp_path, "bad", arrays, np.arange(6) % CLASSES, num_classes=CLASSES,
                     members={index: {"cls": b"1", **member}})
    return identity(tmp_path, "bad")


def _where(tmp_path: Path, index: int = 3) -> str:
    return f"shard file {tmp_path / 'bad' / 'shard-000000.tar'}: sample {index:06d}"


BAD = {
    "float32 array": ({"npy": npy_bytes(np.zeros((2 * C, H, W), np.float32))},
                      "is a float32 array, but the manifest says float16"),
    "big-endian": ({"npy": npy_bytes(np.zeros((2 * C, H, W), ">f2"))}, "is a >f2 array, but the manifest says float16"),
    "mean only": ({"npy": npy_bytes(np.zeros((C, H, W), np.float16))},
                  "has shape [4, 4, 4], but the manifest says [8, 4, 4] (mean then std)"),
    "batched": ({"npy": npy_bytes(np.zeros((1, 2 * C, H, W), np.float16))},
                "has shape [1, 8, 4, 4], but the manifest says [8, 4, 4] (mean then std)"),
    "png": ({"png": b"\x89PNG\r\n\x1a\n"}, "has no npy member"),
    "not npy": ({"npy": b"hello"}, "has a bad npy ("),
    "pickle": ({"npy": npy_bytes(np.array([{"a": 1}], dtype=object))}, "has a bad npy (Object arrays cannot be loaded"),
    "npz": ({"npy": b"PK\x03\x04" + bytes(100)}, "has a bad npy ("),
    "nan": ({"npy": npy_bytes(np.full((2 * C, H, W), np.nan, np.float16))}, "holds non-finite values"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sample_is_one_line(tmp_path: Path, case: str):
    member, message = BAD[case]
    spec = _bad_set(tmp_path, member)
    msg = one_line_error(lambda: take(spec, 1, batch=6))  # the whole (one-shard) set in one batch
    assert msg.startswith(f"{_where(tmp_path)} {message}"), msg


def test_bad_first_sample_fails_at_open(tmp_path: Path):
    from scm_graph.data.stream import open_shards

    spec = _bad_set(tmp_path, BAD["mean only"][0], index=0)
    msg = one_line_error(open_shards, spec)
    assert msg == f"{_where(tmp_path, 0)} {BAD['mean only'][1]}"


def test_npz_archive_is_named(tmp_path: Path):
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((2 * C, H, W), np.float16))
    spec = _bad_set(tmp_path, {"npy": buf.getvalue()})
    msg = one_line_error(lambda: take(spec, 1, batch=6))
    assert msg == f"{_where(tmp_path)} has a bad npy (an .npz archive, not one array)"


def test_changed_bytes_fail_the_checksum(tmp_path: Path):
    import tarfile

    spec = _bad_set(tmp_path, {"npy": npy_bytes(_posteriors()[3])})  # a valid sample; now flip one byte of it
    path = tmp_path / "bad" / "shard-000000.tar"
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            if name == "000003.npy":
                data = data[:-1] + bytes([data[-1] ^ 1])
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    import json

    d = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    d["shard_bytes"] = [path.stat().st_size]
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(d))
    msg = one_line_error(lambda: take(spec, 1, batch=6))
    assert msg == f"{_where(tmp_path)} does not match its sha256 checksum (corrupt data)"
