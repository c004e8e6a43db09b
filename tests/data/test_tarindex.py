"""The shard index (scm_graph.data.tarindex): the samples it makes equal webdataset's own reading of the tar
file, on the first pass and on cached ones; the cache follows a rewritten shard (of another size or the same)
and keeps to its bound; a file running past the end of the archive, or cut short under an open pass, is an
error."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from scm_graph.data import tarindex
from scm_graph.data.digits import digits_source
from scm_graph.data.stream import _read_shards
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    write_set(digits_source(), tmp_path, shard_size=700, progress=False)  # 700, 700, 397 samples
    return [str(p) for p in sorted((tmp_path / "digits").glob("shard-*.tar"))]


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(tarindex, "_cache", type(tarindex._cache)())


def reference(url: str) -> list[dict]:
    """webdataset's reading: tar members, grouped by key."""
    with open(url, "rb") as f:
        return list(group_by_keys({**m, "__url__": url} for m in tar_file_iterator(f)))


def test_samples_equal_webdatasets(shards: list[str]):
    for url in shards:
        want = reference(url)
        assert len(want) in (700, 397)
        first, cached = list(tarindex.read(url)), list(tarindex.read(url))
        assert first == want and cached == want
        assert all(type(v) is bytes for s in first for k, v in s.items() if not k.startswith("__"))


def counting_builds(monkeypatch) -> list[str]:
    builds: list[str] = []
    real = tarindex.build
    monkeypatch.setattr(tarindex, "build", lambda f, url: builds.append(url) or real(f, url))
    return builds


def test_built_once_per_shard_and_again_when_rewritten(shards: list[str], monkeypatch):
    builds = counting_builds(monkeypatch)
    a, b = shards[0], shards[2]
    for _ in range(3):
        list(tarindex.read(a))
    assert builds == [a]
    tmp = a + ".new"  # replaced as the shard writer does: a new file renamed over the old
    Path(tmp).write_bytes(Path(b).read_bytes())
    os.replace(tmp, a)
    got = list(tarindex.read(a))
    assert builds == [a, a]
    assert [s["__key__"] for s in got] == [s["__key__"] for s in reference(b)] and len(got) == 397
    one, two = tmp + ".1", tmp + ".2"  # tars of the very same size (a 10240-byte record), other layouts
    write_tar(one, {"k1": {"png": b"x" * 600, "cls": b"1"}})
    write_tar(two, {"k1": {"png": b"a" * 10, "cls": b"2"}, "k2": {"png": b"b" * 10, "cls": b"3"}})
    assert os.path.getsize(one) == os.path.getsize(two)
    for src in (one, two):
        os.replace(src, a)
        assert list(tarindex.read(a)) == reference(a)
    assert builds == [a, a, a, a]


def write_tar(path: str, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))


def test_a_path_spelt_two_ways_names_the_samples_as_asked(shards: list[str]):
    a = shards[0]
    other = str(Path(a).parent / ".." / Path(a).parent.name / Path(a).name)
    list(tarindex.read(a))
    assert {s["__url__"] for s in tarindex.read(other)} == {other}


def test_cache_keeps_to_its_bound(shards: list[str], monkeypatch):
    monkeypatch.setattr(tarindex, "CACHE_SAMPLES", 1000)
    builds = counting_builds(monkeypatch)
    a, b, c = shards
    for url in (a, b, b, a, c):  # 700 + 700 > 1000: each shard of 700 pushes out the other
        list(tarindex.read(url))
    assert builds == [a, b, a, c]
    assert sum(len(v) for v in tarindex._cache.values()) <= 1000
    monkeypatch.setattr(tarindex, "CACHE_SAMPLES", 500)  # a shard bigger than the bound is read, not kept,
    tarindex.forget()                                     # and leaves the smaller ones in place
    list(tarindex.read(c))
    assert len(list(tarindex.read(a))) == 700 and [len(v) for v in tarindex._cache.values()] == [397]


def test_file_running_past_the_end(shards: list[str]):
    url = shards[0]
    data = Path(url).read_bytes()
    with tarfile.open(url) as tf:
        cut = next(m for m in tf if m.name.endswith(".png") and m.size > 20).offset_data + 10
    Path(url).write_bytes(data[:cut])  # mid-member: its header says more data than there is
    with pytest.raises(ValueError, match="unexpected end of data"):
        list(tarindex.read(url))


def test_a_shard_cut_short_under_an_open_pass(shards: list[str]):
    """Cut in place (not replaced) while a pass reads it: one line of error, not a crash."""
    url = shards[0]
    list(tarindex.read(url))  # indexed
    samples = _read_shards([{"url": url}], {})
    next(samples)
    with open(url, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(UserError, match="truncated or corrupt .*unexpected end of data"):
        list(samples)
