"""Property tests of the spec's value checks, over every field (read from the dataclasses, so a new field is
covered without touching this file):

* any command-line override (numbers, negatives, 0, huge, nan/inf, text, empty and wrong-length tuples,
  booleans spelled many ways) ends as a valid spec or a one-line UserError, through apply_overrides +
  validate + check_net on a resolved 1x8x8 data section -- never any other exception;
* a value inside a field's declared range is accepted and arrives unchanged;
* any Python value in a spec file gives a valid spec or a one-line UserError from validate;
* a few fixed examples through the train CLI: exit 2 and one line.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scm_graph.checks import Check
from scm_graph.errors import UserError
from scm_graph.model import check_net
from scm_graph.spec import Spec, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, assert_user_error, run_cli

SCT = read_spec_file(SPECS / "digits_sct.py")
SETTINGS = {"derandomize": True, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    """Dotted path: 'optim.betas'."""
    tp: Any
    """The bare type: float, tuple[int, ...], Literal['unet', 'dit'], ..."""
    checks: tuple[Check, ...]

    def get(self, spec: Spec) -> Any:
        for part in self.name.split("."):
            spec = getattr(spec, part)
        return spec

    def put(self, spec: Any, value: Any, path: list[str] | None = None) -> Any:
        head, *rest = path if path is not None else self.name.split(".")
        new = self.put(getattr(spec, head), value, rest) if rest else value
        return dataclasses.replace(spec, **{head: new})


def _leaves(cls: type = Spec, prefix: str = "") -> list[Leaf]:
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, checks = hints[f.name], ()
        if typing.get_origin(tp) is Annotated:
            tp, *meta = typing.get_args(tp)
            checks = tuple(m for m in meta if isinstance(m, Check))
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append(Leaf(prefix + f.name, tp, checks))
    return out


LEAVES = _leaves()
BOOL_FLAG_VALUES = {"true": True, "false": False, "True": True, "False": False, "TRUE": True, "FALSE": False,
                    "yes": True, "no": False, "on": True, "off": False, "Yes": True, "OFF": False}


def test_the_walk_finds_every_field():
    assert len(LEAVES) >= 45 and len({leaf.name for leaf in LEAVES}) == len(LEAVES)
    kinds = {leaf.tp if typing.get_origin(leaf.tp) is None else typing.get_origin(leaf.tp) for leaf in LEAVES}
    assert kinds <= {int, float, bool, str, tuple, Literal}, kinds  # the token strategies below know each kind


# ----------------------------------------------------------------------------- any override


def _not_help(token: str) -> bool:
    return not token.startswith(("-h", "--h"))  # --help (or an abbreviation of it) prints help and exits 0


NUMBER_TOKENS = st.one_of(
    st.integers(-3, 3).map(str),
    st.integers().map(str),  # unbounded: sometimes far beyond int64
    st.floats().map(repr),  # nan, inf, -0.0, 5e-324, 1.7976931348623157e+308, ...
    st.sampled_from(["0", "-0", "1", "-1", "0.5", "-0.5", "1e-8", "1e400", "-1e400", "nan", "NaN", "-nan", "inf",
                     "-inf", "Infinity", "2147483647", "2147483648", "99999999999999999999999", "1e3", "3.0",
                     "0x10", "1_000", " 7 ", "", "٣"]),
)
BOOL_TOKENS = st.sampled_from([*BOOL_FLAG_VALUES, "1", "0", "t", "f", "maybe", "", "none", "None"])
TEXT_TOKENS = st.one_of(
    st.text(max_size=8).filter(_not_help),
    st.sampled_from(["digits", "cpu", "cuda", "cuda:0", "cuda:", "gpu", "mps", "auto", "a/b", "/abs", ".x", "..",
                     "", " ", "a\nb", "\t", "\x00", "\udcff", "--x", "-1x", "a b", "unet", "dit", "pixel",
                     "channel", "radam", "sct", "bf16", "lines"]),
)


def _token(tp: Any) -> st.SearchStrategy[str]:
    mine: st.SearchStrategy[str]
    if typing.get_origin(tp) is Literal:
        mine = st.sampled_from([str(c) for c in typing.get_args(tp)])
    elif tp is bool:
        mine = BOOL_TOKENS
    elif tp is int:
        mine = st.integers(-(2**40), 2**40).map(str)
    elif tp is float:
        mine = st.floats(-1e6, 1e6).map(repr)
    else:
        mine = TEXT_TOKENS
    return st.one_of(mine, mine, mine, mine, NUMBER_TOKENS, BOOL_TOKENS, TEXT_TOKENS)  # mostly plausible: reach validate


def _value_tokens(leaf: Leaf) -> st.SearchStrategy[list[str]]:
    if typing.get_origin(leaf.tp) is tuple:
        args = typing.get_args(leaf.tp)
        elem = _token(args[0])
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(elem, max_size=4)
        counts = [len(args)] * 4 + list(range(len(args) + 2))  # mostly the right count
        return st.sampled_from(counts).flatmap(lambda n: st.lists(elem, min_size=n, max_size=n))
    return st.sampled_from([1] * 6 + [0, 2]).flatmap(lambda n: st.lists(_token(leaf.tp), min_size=n, max_size=n))


@st.composite
def _override(draw) -> list[str]:
    leaf = draw(st.sampled_from(LEAVES))
    tokens = draw(_value_tokens(leaf))
    flag = "--" + (leaf.name.replace("_", "-") if draw(st.booleans()) else leaf.name)
    if len(tokens) == 1 and draw(st.booleans()):
        return [f"{flag}={tokens[0]}"]
    return [flag, *tokens]


OVERRIDES = st.lists(_override(), min_size=1, max_size=3).map(lambda parts: [a for p in parts for a in p])


def _assert_one_line(e: UserError) -> str:
    msg = str(e)
    assert msg and len(msg.splitlines()) == 1 and "\r" not in msg, repr(msg)
    return msg


def resolve_and_check(args: list[str]) -> Spec | str:
    """The train CLI's checks in-process, with a digits-like resolved data section: the checked spec, or the
    message of the one-line UserError (any other exception propagates)."""
    try:
        spec = apply_overrides(SCT, args)
        validate(spec)
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=8, channels=1))
        validate(spec)
        check_net(spec)
        return spec
    except UserError as e:
        return _assert_one_line(e)


@settings(max_examples=150, **SETTINGS)
@given(args=OVERRIDES)
def test_any_override_is_a_valid_spec_or_one_line(args: list[str]):
    resolve_and_check(args)


# ----------------------------------------------------------------------------- values in range are accepted


def _bounds(leaf: Leaf) -> dict[str, Any]:
    b: dict[str, Any] = {}
    for c in leaf.checks:
        for k in ("ge", "gt", "le", "lt"):
            if getattr(c, k) is not None:
                b[k] = getattr(c, k)
    return b


def _valid_number(tp: type, b: dict[str, Any]) -> st.SearchStrategy:
    lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if tp is int:
        lo = None if lo is None else math.ceil(lo) + (1 if "gt" in b and lo == math.ceil(lo) else 0)
        hi = None if hi is None else math.floor(hi) - (1 if "lt" in b and hi == math.floor(hi) else 0)
        return st.integers(lo, hi)
    return st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False, allow_infinity=False)


def _valid_value(leaf: Leaf) -> st.SearchStrategy:
    tp, b = leaf.tp, _bounds(leaf)
    if typing.get_origin(tp) is Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp in (int, float):
        return _valid_number(tp, b)
    if tp is bool:
        return st.booleans()
    if tp is str:
        patterns = [c.pattern for c in leaf.checks if c.pattern is not None]
        return st.from_regex(patterns[0], fullmatch=True) if patterns else st.text()
    args = typing.get_args(tp)
    nonempty = any(c.nonempty for c in leaf.checks)
    if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is Literal:  # distinct choices
        return st.lists(st.sampled_from(typing.get_args(args[0])), min_size=int(nonempty), max_size=3, unique=True).map(tuple)
    if len(args) == 2 and args[1] is Ellipsis:
        return st.lists(_valid_number(args[0], b), min_size=int(nonempty), max_size=4).map(tuple)
    return st.tuples(*(_valid_number(a, b) for a in args))


def _cli_words(leaf: Leaf, value: Any) -> list[str]:
    """The override that sets `value`; strings as --flag=VALUE (a value may start with '-')."""
    if isinstance(value, bool):
        return [f"--{leaf.name}", next(w for w, v in BOOL_FLAG_VALUES.items() if v is value)]
    if isinstance(value, tuple):
        return [f"--{leaf.name}", *(v if isinstance(v, str) else repr(v) for v in value)]
    if isinstance(value, str):
        return [f"--{leaf.name}={value}"]
    return [f"--{leaf.name}", repr(value)]


# Fields whose valid values depend on another field's (cross-field rules, tested in tests/test_spec.py):
# a value in range alone may still break a rule (scd without a teacher, a batch that accum does not divide).
JOINED = ("data.mean", "data.std", "objective.kind", "objective.guidance", "train.batch", "train.accum",
          "objective.ict_steps", "train.eval_t_mid", "objective.sigma_d")  # s0 <= s1; eval_t_mid < t_max(sigma_d)


@st.composite
def _valid_override(draw) -> tuple[Leaf, Any]:
    leaf = draw(st.sampled_from([lf for lf in LEAVES if lf.name not in JOINED]))
    return leaf, draw(_valid_value(leaf))


@settings(max_examples=120, **SETTINGS)
@given(lv=_valid_override())
def test_a_value_in_range_is_accepted_unchanged(lv: tuple[Leaf, Any]):
    leaf, value = lv
    spec = apply_overrides(SCT, _cli_words(leaf, value))
    got = leaf.get(spec)
    assert got == value and type(got) is type(value), (got, value)
    validate(spec)


# ----------------------------------------------------------------------------- any value from a spec file

SCALARS = st.one_of(
    st.integers(), st.integers(-(10**400), 10**400), st.floats(), st.booleans(), st.none(), st.text(max_size=6),
)
PY_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3).map(tuple), st.lists(SCALARS, max_size=3),
                      st.dictionaries(st.text(max_size=2), SCALARS, max_size=2))


@settings(max_examples=200, **SETTINGS)
@given(leaf=st.sampled_from(LEAVES), value=PY_VALUES, second=st.sampled_from(LEAVES), value2=PY_VALUES)
def test_any_python_value_is_a_valid_spec_or_one_line(leaf: Leaf, value: Any, second: Leaf, value2: Any):
    spec = second.put(leaf.put(SCT, value), value2)
    try:
        validate(spec)
    except UserError as e:
        _assert_one_line(e)
        return
    resolved = dataclasses.replace(spec, data=dataclasses.replace(spec.data, resolution=8, channels=1))
    try:
        validate(resolved)
        check_net(resolved)
    except UserError as e:
        _assert_one_line(e)


# ----------------------------------------------------------------------------- a few through the train CLI


@pytest.mark.parametrize("args,needle", [
    (["--train.batch", "1e3"], "--train.batch"),  # tyro's parse error
    (["--train.device", "cuda\n"], "train.device must be auto, cpu, mps, cuda or cuda:N, not 'cuda\\n'"),
    (["--data.mean", "nan", "--net.unet.channel_mult", "1", "0"], "data.mean"),
])
def test_train_cli_examples(args: list[str], needle: str):
    assert_user_error(run_cli("scm_graph.train", "specs/digits_sct.py", *args, timeout=120), needle)
