"""The manifest: loading and validation, missing sets and shard files, resolving a spec against it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scm_graph.data.digits import digits_source
from scm_graph.data.manifest import Manifest, resolve_spec
from scm_graph.data.stream import open_shards
from scm_graph.data.writer import write_set
from scm_graph.errors import UserError
from scm_graph.spec import DataSpec, Spec
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, one_line_error


def dspec(root: Path, **kw) -> DataSpec:
    return DataSpec(name=kw.pop("name", "digits"), root=str(root), **kw)


@pytest.fixture(scope="module")
def sct() -> Spec:
    return read_spec_file(SPECS / "digits_sct.py")


def test_manifest_load(root: Path):
    m = Manifest.load(root / "digits")
    assert m.name == "digits" and m.count == 1797 and m.shape == (1, 8, 8) and m.num_classes == 10
    assert m.labels and m.class_names == tuple(str(i) for i in range(10)) and len(m.shards) == 4
    assert open_shards(dspec(root)) == m


def test_missing_set_is_user_error(tmp_path: Path):
    with pytest.raises(UserError) as e:
        open_shards(dspec(tmp_path, name="digits"))
    msg = str(e.value)
    assert str(tmp_path / "digits") in msg and "python -m scm_graph.shard" in msg and "\n" not in msg
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid manifest.*python -m scm_graph.shard"):
        Manifest.load(tmp_path / "broken")


def test_missing_shard_file(tmp_path: Path):
    write_set(digits_source(), tmp_path, shard_size=1000, progress=False)
    (tmp_path / "digits" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="shard-000001.tar is missing"):
        open_shards(dspec(tmp_path))


def _manifest(shape=(1, 8, 8), num_classes: int = 10) -> Manifest:
    c = shape[0]
    return Manifest(name="digits", count=100, shape=shape, dtype="uint8", format="png",
                    mean=tuple(70.0 + i for i in range(c)), std=tuple(90.0 + i for i in range(c)),
                    num_classes=num_classes, labels=num_classes > 0,
                    class_names=tuple(str(i) for i in range(num_classes)) or None,
                    source="test", shards=("shard-000000.tar",))


def test_resolve_fills_shape_from_manifest(sct: Spec):
    assert (sct.data.resolution, sct.data.channels, sct.data.num_classes, sct.data.mean) == (0, 0, 0, ())
    r = resolve_spec(sct, _manifest())
    assert (r.data.resolution, r.data.channels, r.data.num_classes) == (8, 1, 10)
    assert r.data.mean == (70.0,) and r.data.std == (90.0,)
    assert dataclasses.replace(r, data=sct.data) == sct  # nothing else changes
    r3 = resolve_spec(sct, _manifest((3, 32, 32), 0))
    assert (r3.data.resolution, r3.data.channels, r3.data.num_classes) == (32, 3, 0)
    assert r3.data.mean == (70.0, 71.0, 72.0) and r3.data.std == (90.0, 91.0, 92.0)
    # resolving a resolved spec against the same manifest is a no-op
    assert resolve_spec(r, _manifest()) == r


def test_resolve_keeps_explicit_stats(sct: Spec):
    s = apply_overrides(sct, ["--data.mean", "1.0", "--data.std", "2.0", "--data.resolution", "8"])
    r = resolve_spec(s, _manifest())
    assert r.data.mean == (1.0,) and r.data.std == (2.0,) and r.data.resolution == 8


@pytest.mark.parametrize("args,shape,classes,needle", [
    (["--data.resolution", "32"], (1, 8, 8), 10, "resolution"),
    (["--data.channels", "3"], (1, 8, 8), 10, "channels"),
    (["--data.channels", "1"], (3, 32, 32), 10, "channels"),
    (["--net.class_conditional", "true"], (1, 8, 8), 0, "class_conditional"),
])
def test_resolve_rejects_mismatches(sct: Spec, args, shape, classes, needle):
    s = apply_overrides(sct, args)
    assert needle in one_line_error(resolve_spec, s, _manifest(shape, classes))


