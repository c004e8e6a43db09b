"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from scm_graph.data.digits import digits_source
from scm_graph.data.writer import write_set


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The digits as 4 shards (500, 500, 500, 297 samples)."""
    out = tmp_path_factory.mktemp("shards")
    write_set(digits_source(), out, shard_size=500, progress=False)
    return out
