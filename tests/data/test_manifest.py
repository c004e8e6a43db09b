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
    for split in ("train", "heldout"):  # the digits' splits say how they are written too
        assert one_line_error(Manifest.load, tmp_path / f"digits-{split}").endswith(
            f"run `python -m scm_graph.shard digits --split {split} --out {tmp_path}`")


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
    """Replace the shard list, keeping shard_counts / shard_bytes the same length and count their sum (so only the names are wrong)."""
    d["shards"] = shards
    d["shard_counts"] = d["shard_counts"][: len(shards)] + [1] * (len(shards) - len(d["shard_counts"]))
    d["shard_bytes"] = d["shard_bytes"][: len(shards)] + [1024] * (len(shards) - len(d["shard_bytes"]))
    if shards:
        d["count"] = sum(d["shard_counts"])


def _channels(d: dict, c: int) -> None:
    """Shape with c channels and c-long mean/std (so only the channel count is wrong)."""
    d["shape"] = [c, 8, 8]
    d["mean"], d["std"] = [1.0] * c, [2.0] * c


def _set(key: str, value):
    """An edit that sets one field."""
    return lambda d: d.update({key: value})


def _item(key: str, i: int, value):
    """An edit that sets one entry of a list field."""
    return lambda d: d[key].__setitem__(i, value)


SHAPE = "shape must be [channels, height, width] with 1 or 3 channels and positive sizes, not "
NAMES = json.dumps([str(i) for i in range(10)])
SHARDS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]

# Each edit of the digits manifest (4 shards: 500, 500, 500, 297 samples) breaks exactly one check of
# `_manifest_from_dict`; the message is what `Manifest.load` must say inside "invalid manifest PATH (...)".
BAD_MANIFESTS = {
    "version_2": (_set("version", 2), "unsupported version 2, expected 1"),
    "version_missing": (lambda d: d.pop("version"), "unsupported version None, expected 1"),
    "version_str": (_set("version", "1"), "unsupported version '1', expected 1"),
    "version_float": (_set("version", 1.0), "unsupported version 1.0, expected 1"),
    "version_bool": (_set("version", True), "unsupported version True, expected 1"),
    "unknown_field": (_set("colour", "red"), 'unknown field "colour"'),
    "missing_count": (lambda d: d.pop("count"), "missing field count"),
    "missing_class_names": (lambda d: d.pop("class_names"), "missing field class_names"),
    "shape_2d": (_set("shape", [1, 8]), SHAPE + "[1, 8]"),
    "shape_4d": (_set("shape", [1, 8, 8, 1]), SHAPE + "[1, 8, 8, 1]"),
    "shape_zero": (_set("shape", [1, 0, 8]), SHAPE + "[1, 0, 8]"),
    "shape_negative": (_set("shape", [1, 8, -8]), SHAPE + "[1, 8, -8]"),
    "shape_float": (_set("shape", [1, 8.0, 8]), SHAPE + "[1, 8.0, 8]"),
    "shape_fraction": (_set("shape", [1, 8, 7.5]), SHAPE + "[1, 8, 7.5]"),
    "shape_str": (_set("shape", ["1", 8, 8]), SHAPE + '["1", 8, 8]'),
    "shape_bool": (_set("shape", [True, 8, 8]), SHAPE + "[true, 8, 8]"),
    "shape_not_list": (_set("shape", "1x8x8"), SHAPE + '"1x8x8"'),
    "channels_2": (lambda d: _channels(d, 2), SHAPE + "[2, 8, 8]"),
    "channels_4": (lambda d: _channels(d, 4), SHAPE + "[4, 8, 8]"),
    "dtype": (_set("dtype", "uint16"), 'dtype must be "uint8" in a png set, not "uint16"'),
    "dtype_number": (_set("dtype", 8), "dtype must be a string, not 8"),
    "format": (_set("format", "jpeg"), 'format must be "png" or "npy", not "jpeg"'),
    "mean_length": (_set("mean", [1.0, 2.0]), "mean must be a list of 1 finite number (one per channel), not [1.0, 2.0]"),
    "mean_str": (_set("mean", ["70"]), 'mean must be a list of 1 finite number (one per channel), not ["70"]'),
    "mean_infinite": (_set("mean", [float("inf")]), "mean must be a list of 1 finite number (one per channel), not [Infinity]"),
    "mean_nan": (_set("mean", [float("nan")]), "mean must be a list of 1 finite number (one per channel), not [NaN]"),
    "mean_bool": (_set("mean", [True]), "mean must be a list of 1 finite number (one per channel), not [true]"),
    "std_length": (_set("std", []), "std must be a list of 1 finite number > 0 (one per channel), not []"),
    "std_zero": (_set("std", [0.0]), "std must be a list of 1 finite number > 0 (one per channel), not [0.0]"),
    "std_negative": (_set("std", [-3]), "std must be a list of 1 finite number > 0 (one per channel), not [-3]"),
    "std_infinite": (_set("std", [float("inf")]), "std must be a list of 1 finite number > 0 (one per channel), not [Infinity]"),
    "count_zero": (_set("count", 0), "count must be an integer >= 1, not 0"),
    "count_negative": (_set("count", -5), "count must be an integer >= 1, not -5"),
    "count_float": (_set("count", 1797.0), "count must be an integer >= 1, not 1797.0"),
    "count_fraction": (_set("count", 3.7), "count must be an integer >= 1, not 3.7"),
    "count_str": (_set("count", "1797"), 'count must be an integer >= 1, not "1797"'),
    "count_bool": (_set("count", True), "count must be an integer >= 1, not true"),
    "count_not_sum": (_set("count", 1796), "shard_counts add up to 1797, but count is 1796"),
    "no_shards": (lambda d: _set_shards(d, []), "shards must be a non-empty list of shard file names, not []"),
    "shards_not_list": (_set("shards", "shard-000000.tar"), 'shards must be a non-empty list of shard file names, not "shard-000000.tar"'),
    "shard_in_subfolder": (lambda d: _set_shards(d, ["sub/shard-000000.tar", *SHARDS[1:]]),
                           'shards: "sub/shard-000000.tar" is not a plain file name ending in .tar'),
    "shard_absolute": (lambda d: _set_shards(d, [*SHARDS[:3], "/etc/shard.tar"]),
                       'shards: "/etc/shard.tar" is not a plain file name ending in .tar'),
    "shard_hidden": (lambda d: _set_shards(d, [*SHARDS[:3], ".shard-000003.tar"]),
                     'shards: ".shard-000003.tar" is not a plain file name ending in .tar'),
    "shard_dotdot": (lambda d: _set_shards(d, ["..", *SHARDS[1:]]), 'shards: ".." is not a plain file name ending in .tar'),
    "shard_not_tar": (lambda d: _set_shards(d, [*SHARDS[:3], "shard-000003.zip"]),
                      'shards: "shard-000003.zip" is not a plain file name ending in .tar'),
    "shard_number": (lambda d: _set_shards(d, [*SHARDS[:3], 3]), "shards: 3 is not a plain file name ending in .tar"),
    "shard_twice": (lambda d: _set_shards(d, [*SHARDS[:3], SHARDS[1]]), 'shards: "shard-000001.tar" is listed twice'),
    "labels_str": (_set("labels", "false"), 'labels must be true or false, not "false"'),
    "labels_int": (_set("labels", 1), "labels must be true or false, not 1"),
    "labels_without_classes": (_set("num_classes", 0), "labels is true but num_classes is 0"),
    "classes_without_labels": (_set("labels", False), "labels is false but num_classes is 10"),
    "num_classes_float": (_set("num_classes", 10.0), "num_classes must be an integer >= 0, not 10.0"),
    "num_classes_negative": (_set("num_classes", -1), "num_classes must be an integer >= 0, not -1"),
    "class_names_short": (lambda d: d["class_names"].pop(), "class_names must be a list of 10 strings (num_classes), not "
                          + json.dumps([str(i) for i in range(9)])),
    "class_names_null": (_set("class_names", None), "class_names must be a list of 10 strings (num_classes), not null"),
    "class_names_numbers": (_set("class_names", list(range(10))), "class_names must be a list of 10 strings (num_classes), not "
                            + json.dumps(list(range(10)))),
    "class_names_unlabelled": (lambda d: d.update(labels=False, num_classes=0),
                               f"class_names must be null for an unlabelled set, not {NAMES}"),
    "shard_counts_length": (_set("shard_counts", [500, 500, 797]),
                            "shard_counts must be a list of 4 positive integers (one per shard), not [500, 500, 797]"),
    "shard_counts_float": (_item("shard_counts", 3, 297.0),
                           "shard_counts must be a list of 4 positive integers (one per shard), not [500, 500, 500, 297.0]"),
    "shard_counts_zero": (_set("shard_counts", [500, 500, 797, 0]),
                          "shard_counts must be a list of 4 positive integers (one per shard), not [500, 500, 797, 0]"),
    "shard_bytes_length": (_set("shard_bytes", [1024] * 5),
                           "shard_bytes must be a list of 4 positive integers (one per shard), not [1024, 1024, 1024, 1024, 1024]"),
    "shard_bytes_str": (_set("shard_bytes", ["1024", 1024, 1024, 1024]),
                        'shard_bytes must be a list of 4 positive integers (one per shard), not ["1024", 1024, 1024, 1024]'),
    "shard_bytes_negative": (_set("shard_bytes", [1024, -1024, 1024, 1024]),
                             "shard_bytes must be a list of 4 positive integers (one per shard), not [1024, -1024, 1024, 1024]"),
    "sample_checksum": (_set("sample_checksum", "md5"), 'sample_checksum must be "sha256" or null, not "md5"'),
    "name_number": (_set("name", 3), "name must be a string, not 3"),
    "source_null": (_set("source", None), "source must be a string, not null"),
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
    edit, problem = BAD_MANIFESTS[case]
    folder = _write_manifest(root, tmp_path, edit)
    msg = one_line_error(Manifest.load, folder)
    assert msg == (f"invalid manifest {folder / 'manifest.json'} ({problem}); "
                   f"run `python -m scm_graph.shard digits --out {tmp_path} --force`")


@pytest.mark.parametrize("text,problem", [
    ("[1, 2]", "expected a JSON object, not [1, 2]"),
    ('"manifest"', 'expected a JSON object, not "manifest"'),
    (b"\xff{}", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
])
def test_manifest_that_is_not_an_object(tmp_path: Path, text, problem: str):
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    msg = one_line_error(Manifest.load, folder)
    assert msg.startswith(f"invalid manifest {folder / 'manifest.json'} ({problem}); run"), msg


def test_manifest_without_optional_fields_loads(root: Path, tmp_path: Path):
    """An older set (no shard_counts, shard_bytes, sample_checksum) still loads, and to_json writes no checksum key for it."""
    d = json.loads((root / "digits" / "manifest.json").read_text())
    assert d["sample_checksum"] == "sha256"
    for k in ("shard_counts", "shard_bytes", "sample_checksum"):
        d.pop(k)
    m = _manifest_from_dict(d)
    assert m.sample_checksum is None and m.shard_counts == () and m.shard_bytes == ()
    assert "sample_checksum" not in json.loads(m.to_json())
    assert _manifest_from_dict({**d, "sample_checksum": None}) == m
