"""The manifest: loading and validation, missing sets and shard files, resolving a spec against it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from scm_graph.data.digits import digits_source
from scm_graph.data.manifest import Manifest, _manifest_from_dict, resolve_spec
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
    with pytest.raises(UserError, match="invalid manifest.*python -m scm_graph.shard") as e:
        Manifest.load(tmp_path / "broken")
    msg = str(e.value)
    assert msg.startswith(f"invalid manifest {tmp_path / 'broken' / 'manifest.json'} (Expecting property name"), msg
    assert msg.endswith(f"--name broken --out {tmp_path} --force`") and "\n" not in msg, msg
    (tmp_path / "nofile").mkdir()  # the folder exists, its manifest does not
    msg = one_line_error(Manifest.load, tmp_path / "nofile")
    assert msg.startswith(f"shard set {tmp_path / 'nofile'} not found (manifest missing)"), msg
    assert str(tmp_path / "digits") in one_line_error(Manifest.load, tmp_path / "digits")
    assert "(folder missing)" in one_line_error(Manifest.load, tmp_path / "digits")
    assert one_line_error(Manifest.load, tmp_path / "digits").endswith(f"run `python -m scm_graph.shard digits --out {tmp_path}`")


def test_missing_shard_file(tmp_path: Path):
    write_set(digits_source(), tmp_path, shard_size=1000, progress=False)
    (tmp_path / "digits" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="shard-000001.tar is missing") as e:
        open_shards(dspec(tmp_path))
    assert str(e.value) == (f"shard file {tmp_path / 'digits' / 'shard-000001.tar'} is missing; "
                            f"run `python -m scm_graph.shard digits --out {tmp_path} --force`")


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


# ----------------------------------------------------------------------------- manifest validation


def _set_shards(d: dict, shards: list) -> None:
    """Replace the shard list, keeping shard_counts / shard_bytes the same length (so only the names are wrong)."""
    d["shards"] = shards
    d["shard_counts"] = d["shard_counts"][: len(shards)] + [1] * (len(shards) - len(d["shard_counts"]))
    d["shard_bytes"] = d["shard_bytes"][: len(shards)] + [1024] * (len(shards) - len(d["shard_bytes"]))


def _channels(d: dict, c: int) -> None:
    """Shape with c channels and c-long mean/std (so only the channel count is wrong)."""
    d["shape"] = [c, 8, 8]
    d["mean"], d["std"] = [1.0] * c, [2.0] * c


# Each edit breaks exactly one check of `_manifest_from_dict`; the needles are what the message must say.
BAD_MANIFESTS = {
    "version_2": (lambda d: d.update(version=2), ["unsupported version 2", "expected 1"]),
    "version_missing": (lambda d: d.pop("version"), ["unsupported version None", "expected 1"]),
    "version_str": (lambda d: d.update(version="1"), ["unsupported version '1'", "expected 1"]),
    "shape_2d": (lambda d: d.update(shape=[1, 8]), ["bad shape [1, 8]"]),
    "shape_4d": (lambda d: d.update(shape=[1, 8, 8, 1]), ["bad shape [1, 8, 8, 1]"]),
    "shape_zero": (lambda d: d.update(shape=[1, 0, 8]), ["bad shape [1, 0, 8]"]),
    "shape_negative": (lambda d: d.update(shape=[1, 8, -8]), ["bad shape [1, 8, -8]"]),
    "channels_2": (lambda d: _channels(d, 2), ["bad shape [2, 8, 8]"]),
    "channels_4": (lambda d: _channels(d, 4), ["bad shape [4, 8, 8]"]),
    "dtype": (lambda d: d.update(dtype="uint16"), ["unsupported dtype/format uint16/png"]),
    "format": (lambda d: d.update(format="jpeg"), ["unsupported dtype/format uint8/jpeg"]),
    "mean_length": (lambda d: d.update(mean=[1.0, 2.0]), ["mean/std need one value per channel"]),
    "std_length": (lambda d: d.update(std=[]), ["mean/std need one value per channel"]),
    "count_zero": (lambda d: d.update(count=0), ["no samples or bad shard list"]),
    "count_negative": (lambda d: d.update(count=-5), ["no samples or bad shard list"]),
    "no_shards": (lambda d: _set_shards(d, []), ["no samples or bad shard list"]),
    "shard_in_subfolder": (lambda d: _set_shards(d, ["sub/shard-000000.tar", *d["shards"][1:]]),
                           ["no samples or bad shard list"]),
    "shard_absolute": (lambda d: _set_shards(d, [*d["shards"][:3], "/etc/shard.tar"]), ["no samples or bad shard list"]),
    "shard_hidden": (lambda d: _set_shards(d, [*d["shards"][:3], ".shard-000003.tar"]), ["no samples or bad shard list"]),
    "shard_dotdot": (lambda d: _set_shards(d, ["..", *d["shards"][1:]]), ["no samples or bad shard list"]),
    "labels_without_classes": (lambda d: d.update(num_classes=0), ["labels and num_classes disagree"]),
    "classes_without_labels": (lambda d: d.update(labels=False), ["labels and num_classes disagree"]),
    "shard_counts_length": (lambda d: d.update(shard_counts=d["shard_counts"][:3]),
                            ["shard_counts/shard_bytes must match shards"]),
    "shard_bytes_length": (lambda d: d.update(shard_bytes=[*d["shard_bytes"], 1024]),
                           ["shard_counts/shard_bytes must match shards"]),
    "missing_field": (lambda d: d.pop("count"), ["'count'"]),
}


def _write_manifest(root: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the digits manifest (no shard files needed) under tmp_path/digits, edited by `edit`."""
    d = json.loads((root / "digits" / "manifest.json").read_text())
    if edit is not None:
        edit(d)
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(d))
    return folder


def test_manifest_copy_is_valid(root: Path, tmp_path: Path):
    """The unedited copy loads, and each helper edit alone keeps it valid: every case below breaks one check."""
    assert Manifest.load(_write_manifest(root, tmp_path)) == Manifest.load(root / "digits")
    d = json.loads((root / "digits" / "manifest.json").read_text())
    _set_shards(d, [f"s{i}.tar" for i in range(5)])
    _channels(d, 3)
    d.update(labels=False, num_classes=0, class_names=None)
    m = _manifest_from_dict(d)
    assert m.shape == (3, 8, 8) and len(m.shards) == len(m.shard_counts) == len(m.shard_bytes) == 5 and not m.labels


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_invalid_manifest_is_one_line_user_error(root: Path, tmp_path: Path, case: str):
    edit, needles = BAD_MANIFESTS[case]
    folder = _write_manifest(root, tmp_path, edit)
    msg = one_line_error(Manifest.load, folder)
    assert msg.startswith(f"invalid manifest {folder / 'manifest.json'} ("), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert msg.endswith(f"; run `python -m scm_graph.shard digits --out {tmp_path} --force`"), msg
