"""Property tests of the reader: a flipped byte or a cut anywhere in a shard (or a flipped byte in the
manifest) gives exactly the original images and labels, or one line of UserError; never another
exception and never a hang."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scm_graph.data.source import array_source
from scm_graph.data.stream import read_all
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from scm_graph.spec import DataSpec

N, SHARD = 30, 12  # 3 shards: 12, 12, 6 samples
LIMIT_S = 10  # one read of the whole set takes milliseconds; this long means a hang

# Reproducible in CI: a fixed example sequence, no example database written into the tree.
FIXED = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Hang(Exception):
    """Raised by the alarm when reading takes longer than LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hang(f"reading took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class ShardSet:
    """A small labelled 3x5x4 set written once; `corrupt` swaps one file's bytes and puts them back."""

    def __init__(self, root: Path, checksum: bool) -> None:
        rng = np.random.default_rng(7)
        self.images = rng.integers(0, 256, size=(N, 3, 5, 4), dtype=np.uint8)
        self.labels = rng.integers(0, 6, size=N)
        write_set(array_source("tiny", "test", self.images, self.labels, tuple("abcdef")), root, shard_size=SHARD,
                  progress=False)
        self.spec = DataSpec(name="tiny", root=str(root))
        self.folder = root / "tiny"
        manifest = self.folder / "manifest.json"
        if not checksum:  # an older set: no per-sample checksum, so bad bytes reach the PNG decoder
            d = json.loads(manifest.read_text())
            d.pop("sample_checksum")
            manifest.write_text(json.dumps(d))
        self.files = [manifest, *sorted(self.folder.glob("*.tar"))]
        self.original = {p: p.read_bytes() for p in self.files}
        self.headers = {p: _header_offsets(p) for p in self.files[1:]}
        self.expected = [(self.images[i].tobytes(), int(self.labels[i])) for i in range(N)]

    @contextlib.contextmanager
    def corrupt(self, path: Path, data: bytes) -> Iterator[None]:
        path.write_bytes(data)
        try:
            yield
        finally:
            path.write_bytes(self.original[path])

    def read(self) -> list[tuple[bytes, int]] | str:
        """All samples, or the one-line message of the UserError that stopped the read."""
        with time_limit(LIMIT_S):
            try:
                return list(read_all(self.spec))
            except UserError as e:
                msg = str(e)
                assert msg and "\n" not in msg and not re.search(r" at 0x[0-9a-f]+>", msg), msg
                return msg


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> ShardSet:
    s = ShardSet(tmp_path_factory.mktemp("checked"), checksum=True)
    assert s.read() == s.expected and len(s.files) == 4
    return s


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory) -> ShardSet:
    s = ShardSet(tmp_path_factory.mktemp("unchecked"), checksum=False)
    assert s.read() == s.expected
    return s


def _header_offsets(shard: Path) -> list[int]:
    """Where each member's 512-byte tar header starts."""
    with tarfile.open(shard) as tf:
        return [m.offset for m in tf]


def _flip(data: bytes, pos: int, xor: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1:]


def _position(s: ShardSet, path: Path, where: float, header: int | None) -> int:
    """A position anywhere in the file (header None), or byte `header % 512` of a tar header."""
    if header is None:
        return int(where * len(s.original[path]))
    starts = s.headers[path]
    return starts[int(where * len(starts))] + header % 512


SHARD_FLIP = dict(which=st.integers(1, 3), where=st.floats(0, 1, exclude_max=True),
                  header=st.none() | st.integers(0, 511), xor=st.integers(1, 255))


@settings(max_examples=400, **FIXED)
@given(**SHARD_FLIP)
def test_flipped_shard_byte_gives_the_data_or_one_line(checked: ShardSet, which: int, where: float, header: int | None,
                                                       xor: int):
    path = checked.files[which]
    pos = _position(checked, path, where, header)
    with checked.corrupt(path, _flip(checked.original[path], pos, xor)):
        got = checked.read()
    assert got == checked.expected or isinstance(got, str), "a flipped byte changed the data silently"


@settings(max_examples=150, **FIXED)
@given(which=st.integers(1, 3), where=st.floats(0, 1, exclude_max=True))
def test_cut_shard_gives_one_line(checked: ShardSet, which: int, where: float):
    path = checked.files[which]
    data = checked.original[path]
    with checked.corrupt(path, data[: int(where * len(data))]):
        got = checked.read()
    assert isinstance(got, str) and str(path) in got, got


@settings(max_examples=250, **FIXED)
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_flipped_manifest_byte_gives_the_data_or_one_line(checked: ShardSet, where: float, xor: int):
    path = checked.files[0]
    data = checked.original[path]
    with checked.corrupt(path, _flip(data, int(where * len(data)), xor)):
        got = checked.read()
    assert got == checked.expected or isinstance(got, str), "a flipped byte changed the data silently"


@settings(max_examples=250, **FIXED)
@given(**SHARD_FLIP)
def test_older_set_never_crashes(unchecked: ShardSet, which: int, where: float, header: int | None, xor: int):
    """Without the checksum a flip may change the data, but the reader still never raises anything but one line."""
    path = unchecked.files[which]
    pos = _position(unchecked, path, where, header)
    with unchecked.corrupt(path, _flip(unchecked.original[path], pos, xor)):
        got = unchecked.read()
    if not isinstance(got, str):
        assert len(got) == N and all(len(img) == 3 * 5 * 4 and 0 <= lab < 6 for img, lab in got)
