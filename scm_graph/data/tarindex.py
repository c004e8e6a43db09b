"""Where each sample's files lie in a tar shard: read the headers once per process, then every later pass over
the shard reads the spans directly instead of parsing the archive again.

A pass over a shard used to parse every tar header (tarfile) and group the files into samples (webdataset's
`group_by_keys`); for small images that cost twice the decoding. The first pass still does exactly that,
checking the archive as before, but keeps only the byte spans; later passes make the same samples (dicts of
`__key__`, `__url__` and one bytes value per file suffix) from the spans, one positioned read each (a file cut
short under an open stream is an error, not a crash as a memory map would give). The index is kept per process for
shards of up to `CACHE_SAMPLES` samples in all (the least recently used go first) and rebuilt when a shard's
file, size or modification times change (the shard writer replaces whole folders, so a rewritten shard is a new
file).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import group_by_keys

CACHE_SAMPLES = 250_000
"""Samples whose spans one process keeps (about 180 bytes each with the key, measured): CIFAR-10 fits, ImageNet does not."""


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one tar shard, in archive order: sample i has files `fields[i]` at byte spans
    `spans[first[i]:first[i + 1]]` ([start, end) each)."""

    keys: list[str]
    fields: list[tuple[str, ...]]
    spans: np.ndarray
    """[files, 2] int64."""
    first: np.ndarray
    """[samples + 1] int64."""

    def __len__(self) -> int:
        return len(self.keys)

    def samples(self, fd: int, url: str) -> Iterator[dict]:
        """The samples as webdataset makes them, their bytes read from the open shard `fd`."""
        spans, first = self.spans.tolist(), self.first.tolist()
        for i, (key, names) in enumerate(zip(self.keys, self.fields)):
            sample = {"__key__": key, "__url__": url}
            for name, (a, b) in zip(names, spans[first[i]:first[i + 1]]):
                data = os.pread(fd, b - a, a)
                if len(data) != b - a:
                    raise ValueError(f"unexpected end of data in {key}.{name}")
                sample[name] = data
            yield sample


def _members(f: io.BufferedReader, url: str, size: int) -> Iterator[dict]:
    """{"fname", "data": (start, end), "__url__"} of each file in the tar stream f; a bad header or a file running
    past the end is an error, not an early end."""
    try:
        tf = tarfile.open(fileobj=f, mode="r|")
    except tarfile.ReadError as e:
        raise ValueError(f"bad tar header at byte 0 ({e})") from None
    for info in tf:
        if info.isreg():
            if info.offset_data + info.size > size:
                raise ValueError(f"unexpected end of data in {info.name}")
            yield {"fname": info.name, "data": (info.offset_data, info.offset_data + info.size), "__url__": url}
        tf.members = []  # stream mode: keep no index of TarInfo objects
    # tarfile stops quietly at a header it cannot read; a whole archive stops at a zero block
    f.seek(tf.offset)
    block = f.read(512)
    if len(block) < 512 or block.strip(b"\0"):
        raise ValueError(f"bad tar header at byte {tf.offset}")


def build(f: io.BufferedReader, url: str) -> ShardIndex:
    """Parse the headers of the open shard `f` and group its files into samples (webdataset's grouping: key and
    suffix)."""
    size = os.fstat(f.fileno()).st_size
    keys: list[str] = []
    fields: list[tuple[str, ...]] = []
    spans: list[tuple[int, int]] = []
    first = [0]
    interned: dict[tuple[str, ...], tuple[str, ...]] = {}
    f.seek(0)
    for sample in group_by_keys(_members(f, url, size)):
        names = tuple(k for k in sample if not k.startswith("__"))
        keys.append(sample["__key__"])
        fields.append(interned.setdefault(names, names))
        spans.extend(sample[k] for k in names)
        first.append(len(spans))
    return ShardIndex(keys, fields, np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(first, dtype=np.int64))


_Key = tuple[str, int, int, int, int, int]
_cache: OrderedDict[_Key, ShardIndex] = OrderedDict()


def index(f: io.BufferedReader, url: str) -> ShardIndex:
    """The index of the open shard `f`, from this process's cache when the same file (device, inode, size and
    modification times, as `f` has them) was indexed before."""
    st = os.fstat(f.fileno())
    key = (os.path.abspath(url), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    for old in [k for k in _cache if k[0] == key[0]]:  # the shard was rewritten
        del _cache[old]
    found = build(f, url)
    if len(found) > CACHE_SAMPLES:  # read, not kept: keeping it would push out every other shard
        return found
    _cache[key] = found
    while sum(len(v) for v in _cache.values()) > CACHE_SAMPLES:
        _cache.popitem(last=False)
    return found


def forget() -> None:
    """Empty this process's cache (the next pass over each shard parses its headers again)."""
    _cache.clear()


def warm(url: str) -> None:
    """Index the shard now (so that DataLoader workers forked later inherit its index)."""
    with open(url, "rb") as f:
        index(f, url)


def read(url: str) -> Iterator[dict]:
    """The raw samples of one shard (dicts of bytes), in archive order."""
    with open(url, "rb") as f:
        yield from index(f, url).samples(f.fileno(), url)
