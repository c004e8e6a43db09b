"""Spec files and CLI overrides (tyro): loading, overrides, the 0.1 flags, --help, bad files."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest

import scm_graph.spec as specmod
from scm_graph.errors import UserError
from scm_graph.spec import Spec, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, one_line_error, run_cli

SPEC_FILES = sorted(p for p in SPECS.glob("*.py") if not p.name.startswith("_"))  # _imagenet.py is their table, not a spec


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


# ----------------------------------------------------------------------------- overrides


@pytest.fixture(scope="module")
def sct() -> Spec:
    return read_spec_file(SPECS / "digits_sct.py")


def test_overrides_apply(sct: Spec):
    s = apply_overrides(sct, ["--optim.lr", "3e-4", "--train.compile", "false", "--net.unet.channel_mult", "1", "2"])
    assert s.optim.lr == 3e-4
    assert s.train.compile is False
    assert s.net.unet.channel_mult == (1, 2) and isinstance(s.net.unet.channel_mult, tuple)
    # everything else keeps the spec file's values, not Spec()'s defaults
    assert s.net.unet.channels == sct.net.unet.channels == 32
    assert s.train.batch == sct.train.batch and s.data == sct.data and s.objective == sct.objective
    assert dataclasses.replace(s, optim=sct.optim, train=sct.train, net=sct.net) == sct


@pytest.mark.parametrize("word,value", [("false", False), ("False", False), ("FALSE", False), ("true", True),
                                        ("True", True), ("no", False), ("yes", True), ("off", False), ("on", True)])
def test_bool_words(sct: Spec, word: str, value: bool):
    assert apply_overrides(sct, ["--train.compile", word]).train.compile is value
    assert apply_overrides(sct, ["--net.class_conditional", word]).net.class_conditional is value


def test_overrides_underscore_and_hyphen_spellings(sct: Spec):
    a = apply_overrides(sct, ["--train.total_images", "64", "--net.unet.channel_mult", "1", "2", "4"])
    b = apply_overrides(sct, ["--train.total-images", "64", "--net.unet.channel-mult", "1", "2", "4"])
    assert a == b and a.train.total_images == 64 and a.net.unet.channel_mult == (1, 2, 4)


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
    (["--net.unet.channels", "1.5"], "channels"),
    (["--net.unet.channel_mult", "x"], "channel"),
    (["--net.dit.depth", "2.5"], "depth"),
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


@pytest.mark.parametrize("flag,new", [
    ("--net.channels", "--net.unet.channels or --net.dit.width"),
    ("--net.attn_resolutions", "--net.unet.attn_resolutions"),
    ("--net.attn-resolutions", "--net.unet.attn_resolutions"),
    ("--net.depth", "--net.dit.depth"),
])
def test_flat_net_flags_of_version_0_1_name_their_new_place(sct: Spec, flag: str, new: str):
    with pytest.raises(UserError) as e:
        apply_overrides(sct, [flag, "8"])
    assert str(e.value) == f"{flag.replace('-', '_').replace('__', '--')} moved to the network's own section: use {new}"


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
    assert "(default: 32)" in text[text.index("--net.unet.channels"):][:200]


def test_train_usage_without_args():
    res = run_cli("scm_graph.train", timeout=120)
    assert res.returncode == 2 and "usage" in res.stdout


# ----------------------------------------------------------------------------- bad spec files


def test_missing_spec_file(tmp_path: Path):
    assert str(tmp_path / "nope.py") in one_line_error(read_spec_file, tmp_path / "nope.py")
    assert one_line_error(read_spec_file, tmp_path)  # a folder is not a spec file


def test_spec_file_without_spec(tmp_path: Path):
    p = tmp_path / "empty.py"
    p.write_text("X = 1\n")
    assert "SPEC" in one_line_error(read_spec_file, p)
    q = tmp_path / "wrong_type.py"
    q.write_text("SPEC = {'name': 'x'}\n")
    assert "SPEC" in one_line_error(read_spec_file, q)


def test_spec_file_with_syntax_error(tmp_path: Path):
    p = tmp_path / "broken.py"
    p.write_text("from scm_graph.spec import Spec\nSPEC = Spec(name='x'\n")
    assert "SyntaxError" in one_line_error(read_spec_file, p)


def test_spec_file_raising(tmp_path: Path):
    p = tmp_path / "typo.py"
    p.write_text("from scm_graph.spec import NetSpec, Spec\nSPEC = Spec(net=NetSpec(chanels=3))\n")
    assert "chanels" in one_line_error(read_spec_file, p)
    q = tmp_path / "imports_missing.py"
    q.write_text("from no_such_sibling_spec import SPEC\n")
    assert "no_such_sibling_spec" in one_line_error(read_spec_file, q)


def test_spec_file_can_import_sibling(tmp_path: Path):
    (tmp_path / "base_for_test_spec.py").write_text("from scm_graph.spec import Spec\nSPEC = Spec(name='base')\n")
    (tmp_path / "child.py").write_text(
        "import dataclasses\nfrom base_for_test_spec import SPEC as B\nSPEC = dataclasses.replace(B, name='child')\n")
    assert read_spec_file(tmp_path / "child.py") == Spec(name="child")


