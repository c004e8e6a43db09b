"""Spec files, CLI overrides (tyro), --help, JSON round trip, resolve() against a manifest."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest

import scm_graph.spec as specmod
from scm_graph.data import Manifest
from scm_graph.errors import UserError
from scm_graph.spec import Spec, apply_overrides, read_spec_file, resolve, spec_from_json, spec_to_json, validate
from tests.conftest import SPECS, run_cli

SPEC_FILES = sorted(SPECS.glob("*.py"))


def test_spec_files_present():
    names = {p.name for p in SPEC_FILES}
    assert {"digits_sct.py", "digits_diffusion.py"} <= names


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_read_each_spec_file(path: Path):
    before = list(sys.path)
    spec = read_spec_file(path)
    assert isinstance(spec, Spec)
    assert spec.name == path.stem  # the default run folder is runs/<name>
    validate(spec)
    assert sys.path == before  # the spec folder is only on the path while the file loads
    assert read_spec_file(str(path)) == spec  # str paths work and loading is repeatable


def test_digits_specs_content():
    sct = read_spec_file(SPECS / "digits_sct.py")
    dif = read_spec_file(SPECS / "digits_diffusion.py")
    assert sct.objective.kind == "sct" and dif.objective.kind == "diffusion"
    assert sct.data.name == dif.data.name == "digits"
    assert dif.net == sct.net  # the diffusion run can initialise the sCT run (train.init_from)
    assert sct.net.dropout > 0


# ----------------------------------------------------------------------------- overrides


@pytest.fixture(scope="module")
def sct() -> Spec:
    return read_spec_file(SPECS / "digits_sct.py")


def test_overrides_apply(sct: Spec):
    s = apply_overrides(sct, ["--optim.lr", "3e-4", "--train.compile", "false", "--net.channel_mult", "1", "2"])
    assert s.optim.lr == 3e-4
    assert s.train.compile is False
    assert s.net.channel_mult == (1, 2) and isinstance(s.net.channel_mult, tuple)
    # everything else keeps the spec file's values, not Spec()'s defaults
    assert s.net.channels == sct.net.channels == 32
    assert s.train.batch == sct.train.batch and s.data == sct.data and s.objective == sct.objective
    assert dataclasses.replace(s, optim=sct.optim, train=sct.train, net=sct.net) == sct


@pytest.mark.parametrize("word,value", [("false", False), ("False", False), ("FALSE", False), ("true", True),
                                        ("True", True), ("no", False), ("yes", True), ("off", False), ("on", True)])
def test_bool_words(sct: Spec, word: str, value: bool):
    assert apply_overrides(sct, ["--train.compile", word]).train.compile is value
    assert apply_overrides(sct, ["--net.class_conditional", word]).net.class_conditional is value


def test_overrides_underscore_and_hyphen_spellings(sct: Spec):
    a = apply_overrides(sct, ["--train.total_images", "64", "--net.channel_mult", "1", "2", "4"])
    b = apply_overrides(sct, ["--train.total-images", "64", "--net.channel-mult", "1", "2", "4"])
    assert a == b and a.train.total_images == 64 and a.net.channel_mult == (1, 2, 4)


def test_overrides_tuples_literals_and_empty(sct: Spec):
    s = apply_overrides(sct, ["--optim.betas", "0.9", "0.999", "--objective.kind", "diffusion", "--name", "x"])
    assert s.optim.betas == (0.9, 0.999) and s.objective.kind == "diffusion" and s.name == "x"
    assert apply_overrides(sct, []) == sct


@pytest.mark.parametrize("args,get,want", [
    (["--name", "on"], lambda s: s.name, "on"),
    (["--data.name", "no"], lambda s: s.data.name, "no"),
    (["--train.init_from", "off"], lambda s: s.train.init_from, "off"),
])
def test_string_values_that_look_like_bools_are_kept(sct: Spec, args, get, want):
    assert get(apply_overrides(sct, args)) == want


@pytest.mark.parametrize("args,needle", [
    (["--nope", "1"], "--nope"),
    (["--net.chanels", "8"], "chanels"),
    (["--optim.lr", "abc"], "lr"),
    (["--net.channels", "1.5"], "channels"),
    (["--net.channel_mult", "x"], "channel"),
    (["--train.compile", "maybe"], "compile"),
    (["--objective.kind", "foo"], "kind"),
    (["--optim.betas", "0.9"], "betas"),
    (["--train.batch"], "batch"),
])
def test_bad_overrides_are_one_line_user_errors(sct: Spec, args, needle):
    with pytest.raises(UserError) as e:
        apply_overrides(sct, args)
    msg = str(e.value)
    assert msg and "\n" not in msg and needle in msg, msg


# ----------------------------------------------------------------------------- --help


def _leaf_fields(cls: type = Spec, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted name, owning dataclass, field name) of every leaf field, walking nested specs."""
    inst = cls()
    out = []
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            out += _leaf_fields(type(v), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, cls, f.name))
    return out


def _attribute_docstrings() -> dict[tuple[str, str], str]:
    """{(class name, field): docstring} read from scm_graph/spec.py's source (independently of tyro)."""
    tree = ast.parse(Path(specmod.__file__).read_text())
    docs = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for a, b in zip(node.body, node.body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[(node.name, a.target.id)] = b.value.value
    return docs


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_help_lists_every_field_with_its_help():
    res = run_cli("scm_graph.train", "specs/digits_sct.py", "--help", timeout=120)
    assert res.returncode == 0, res.stderr
    text = _norm(res.stdout)
    docs = _attribute_docstrings()
    leaves = _leaf_fields()
    assert len(leaves) >= 45  # the tree has ~50 leaves; guards against a broken walk
    missing = []
    for dotted, cls, name in leaves:
        doc = docs.get((cls.__name__, name))
        assert doc, f"{cls.__name__}.{name} has no attribute docstring"
        head, _, tail = dotted.rpartition(".")
        spellings = {dotted, f"{head}.{tail.replace('_', '-')}" if head else tail.replace("_", "-")}
        m = None
        for s in spellings:
            m = re.search(r"(?<![\w.-])--" + re.escape(s) + r"(?![\w-])", text)
            if m:
                break
        if m is None:
            missing.append(f"--{dotted}: option not listed")
            continue
        first_words = " ".join(doc.split()[:3])
        if first_words not in text[m.end(): m.end() + 400]:
            missing.append(f"--{dotted}: help {first_words!r} not shown")
    assert not missing, missing
    # the spec file's values are the shown defaults
    assert "(default: 32)" in text[text.index("--net.channels"):][:200]


def test_train_usage_without_args():
    res = run_cli("scm_graph.train", timeout=120)
    assert res.returncode == 2 and "usage" in res.stdout


# ----------------------------------------------------------------------------- JSON round trip


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_json_round_trip(path: Path):
    spec = read_spec_file(path)
    back = spec_from_json(spec_to_json(spec))
    assert back == spec
    assert spec_to_json(back) == spec_to_json(spec)
    # with CLI tuples and a resolved data section too
    spec2 = apply_overrides(spec, ["--net.channel_mult", "1", "2", "3", "--optim.betas", "0.5", "0.6"])
    spec2 = resolve(spec2, _manifest())
    back2 = spec_from_json(spec_to_json(spec2))
    assert back2 == spec2 and isinstance(back2.data.mean, tuple) and isinstance(back2.optim.betas, tuple)


def test_json_round_trip_defaults():
    assert spec_from_json(spec_to_json(Spec())) == Spec()


def test_json_without_newer_net_fields_fills_defaults(sct: Spec):
    """Checkpoints written before the DiT / attention fields existed still load."""
    import json

    d = json.loads(spec_to_json(sct))
    for k in ("arch", "head_dim", "patch_size", "depth", "mlp_ratio"):
        d["net"].pop(k)
    old = spec_from_json(json.dumps(d))
    assert old == sct and old.net.arch == "unet" and old.net.head_dim == 64


# ----------------------------------------------------------------------------- bad spec files


def _one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_missing_spec_file(tmp_path: Path):
    assert str(tmp_path / "nope.py") in _one_line_error(read_spec_file, tmp_path / "nope.py")
    assert _one_line_error(read_spec_file, tmp_path)  # a folder is not a spec file


def test_spec_file_without_spec(tmp_path: Path):
    p = tmp_path / "empty.py"
    p.write_text("X = 1\n")
    assert "SPEC" in _one_line_error(read_spec_file, p)
    q = tmp_path / "wrong_type.py"
    q.write_text("SPEC = {'name': 'x'}\n")
    assert "SPEC" in _one_line_error(read_spec_file, q)


def test_spec_file_with_syntax_error(tmp_path: Path):
    p = tmp_path / "broken.py"
    p.write_text("from scm_graph.spec import Spec\nSPEC = Spec(name='x'\n")
    assert "SyntaxError" in _one_line_error(read_spec_file, p)


def test_spec_file_raising(tmp_path: Path):
    p = tmp_path / "typo.py"
    p.write_text("from scm_graph.spec import NetSpec, Spec\nSPEC = Spec(net=NetSpec(chanels=3))\n")
    assert "chanels" in _one_line_error(read_spec_file, p)
    q = tmp_path / "imports_missing.py"
    q.write_text("from no_such_sibling_spec import SPEC\n")
    assert "no_such_sibling_spec" in _one_line_error(read_spec_file, q)


def test_spec_file_can_import_sibling(tmp_path: Path):
    (tmp_path / "base_for_test_spec.py").write_text("from scm_graph.spec import Spec\nSPEC = Spec(name='base')\n")
    (tmp_path / "child.py").write_text(
        "import dataclasses\nfrom base_for_test_spec import SPEC as B\nSPEC = dataclasses.replace(B, name='child')\n")
    assert read_spec_file(tmp_path / "child.py") == Spec(name="child")


# ----------------------------------------------------------------------------- resolve / validate


def _manifest(shape=(1, 8, 8), num_classes: int = 10) -> Manifest:
    c = shape[0]
    return Manifest(name="digits", count=100, shape=shape, dtype="uint8", format="png",
                    mean=tuple(70.0 + i for i in range(c)), std=tuple(90.0 + i for i in range(c)),
                    num_classes=num_classes, labels=num_classes > 0,
                    class_names=tuple(str(i) for i in range(num_classes)) or None,
                    source="test", shards=("shard-000000.tar",))


def test_resolve_fills_shape_from_manifest(sct: Spec):
    assert (sct.data.resolution, sct.data.channels, sct.data.num_classes, sct.data.mean) == (0, 0, 0, ())
    r = resolve(sct, _manifest())
    assert (r.data.resolution, r.data.channels, r.data.num_classes) == (8, 1, 10)
    assert r.data.mean == (70.0,) and r.data.std == (90.0,)
    assert dataclasses.replace(r, data=sct.data) == sct  # nothing else changes
    r3 = resolve(sct, _manifest((3, 32, 32), 0))
    assert (r3.data.resolution, r3.data.channels, r3.data.num_classes) == (32, 3, 0)
    assert r3.data.mean == (70.0, 71.0, 72.0) and r3.data.std == (90.0, 91.0, 92.0)
    # resolving a resolved spec against the same manifest is a no-op
    assert resolve(r, _manifest()) == r


def test_resolve_keeps_explicit_stats(sct: Spec):
    s = apply_overrides(sct, ["--data.mean", "1.0", "--data.std", "2.0", "--data.resolution", "8"])
    r = resolve(s, _manifest())
    assert r.data.mean == (1.0,) and r.data.std == (2.0,) and r.data.resolution == 8


@pytest.mark.parametrize("args,shape,classes,needle", [
    (["--data.resolution", "32"], (1, 8, 8), 10, "resolution"),
    (["--data.channels", "3"], (1, 8, 8), 10, "channels"),
    (["--data.channels", "1"], (3, 32, 32), 10, "channels"),
    (["--net.class_conditional", "true"], (1, 8, 8), 0, "class_conditional"),
])
def test_resolve_rejects_mismatches(sct: Spec, args, shape, classes, needle):
    s = apply_overrides(sct, args)
    assert needle in _one_line_error(resolve, s, _manifest(shape, classes))


@pytest.mark.parametrize("args,needle", [
    (["--train.batch", "0"], "batch"),
    (["--train.total_images", "-1"], "total_images"),
    (["--data.resolution", "8", "--net.attn_resolutions", "16"], "attn_resolutions"),
    (["--data.resolution", "8", "--net.attn_resolutions", "4", "--net.head_dim", "20"], "head_dim"),  # 64 // 20 = 3 heads
    (["--data.resolution", "6", "--net.channel_mult", "1", "2", "2"], "channel_mult"),
    (["--net.arch", "dit", "--net.head_dim", "24"], "head_dim"),
    (["--net.arch", "dit", "--net.head_dim", "16", "--data.resolution", "8", "--net.patch_size", "3"], "patch_size"),
    (["--net.patch_size", "0"], "patch_size"),
    (["--net.depth", "0"], "depth"),
    (["--net.dropout", "1.0"], "dropout"),
    (["--objective.sigma_d", "0"], "sigma_d"),
    (["--objective.sigma_d", "nan"], "sigma_d"),
])
def test_validate_rejects(sct: Spec, args, needle):
    assert needle in _one_line_error(validate, apply_overrides(sct, args))
