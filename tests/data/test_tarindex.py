"""The shard index (scm_graph.data.tarindex): the samples it makes equal webdataset's own reading of the tar
file, on the first pass and on cached ones; the cache follows a rewritten shard and keeps to its bound; a file
running past the end of the archive is an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from scm_graph.data import tarindex
from scm_graph.data.digits import digits_source
from scm_graph.data.writer import write_set


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


def test_built_once_per_shard_and_again_when_rewritten(shards: list[str], monkeypatch):
    builds: list[str] = []
    real = tarindex.build
    monkeypatch.setattr(tarindex, "build", lambda url: builds.append(url) or real(url))
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


def test_cache_keeps_to_its_bound(shards: list[str], monkeypatch):
    monkeypatch.setattr(tarindex, "CACHE_SAMPLES", 1000)
    builds: list[str] = []
    real = tarindex.build
    monkeypatch.setattr(tarindex, "build", lambda url: builds.append(url) or real(url))
    a, b, c = shards
    for url in (a, b, b, a, c):  # 700 + 700 > 1000: each shard of 700 pushes out the other
        list(tarindex.read(url))
    assert builds == [a, b, a, c]
    assert sum(len(v) for v in tarindex._cache.values()) <= 1000
    monkeypatch.setattr(tarindex, "CACHE_SAMPLES", 500)  # a shard bigger than the bound is read, not kept
    tarindex._cache.clear()
    assert len(list(tarindex.read(a))) == 700 and not tarindex._cache


def test_file_running_past_the_end(shards: list[str]):
    url = shards[0]
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(Exception, match="end of data|bad tar header"):
        tarindex.build(url)
