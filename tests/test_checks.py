"""scm_graph.checks against hand-written expectations: bounds in words, type problems, bounds of scalars
and of each tuple element, nonempty, patterns, nested paths, and the exact text of the messages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import pytest

from scm_graph.checks import Check, field_problems
from scm_graph.errors import UserError
from scm_graph.spec import OptimSpec, Spec, TrainSpec, validate

# ----------------------------------------------------------------------------- Check.describe


@pytest.mark.parametrize("check,words", [
    (Check(), ""),
    (Check(ge=0), ">= 0"),
    (Check(gt=0), "> 0"),
    (Check(le=1), "<= 1"),
    (Check(lt=1), "< 1"),
    (Check(ge=0, le=1), "in [0, 1]"),
    (Check(ge=0, lt=1), "in [0, 1)"),
    (Check(gt=0, le=1), "in (0, 1]"),
    (Check(gt=0, lt=1), "in (0, 1)"),
    (Check(ge=2), ">= 2"),
    (Check(ge=0, lt=2**31), "in [0, 2147483648)"),
    (Check(ge=0.0), ">= 0"),  # floats in %g form: no trailing .0
    (Check(gt=0.5), "> 0.5"),
    (Check(gt=1e-8), "> 1e-08"),
    (Check(ge=-1.5, le=2.5), "in [-1.5, 2.5]"),
    (Check(nonempty=True), ""),  # not a bound
    (Check(pattern="[a-z]+", means="letters"), ""),
])
def test_describe(check: Check, words: str):
    assert check.describe() == words


@pytest.mark.parametrize("check,ok,bad", [
    (Check(ge=0), [0, 0.0, -0.0, 1, 1e300], [-1, -1e-300]),
    (Check(gt=0), [1e-300, 1], [0, 0.0, -0.0, -1]),
    (Check(le=1), [1, 1.0, -5], [1.0000001, 2]),
    (Check(lt=1), [0.999999, -5], [1, 1.0]),
    (Check(ge=0, lt=1), [0, 0.5, math.nextafter(1.0, 0)], [1, -1e-12]),
    (Check(), [-1e300, 0, 1e300], []),
])
def test_number_ok_at_the_edges(check: Check, ok: list, bad: list):
    assert all(check.number_ok(v) for v in ok)
    assert not any(check.number_ok(v) for v in bad)


# ----------------------------------------------------------------------------- field_problems


@dataclass(frozen=True)
class Inner:
    k: Annotated[int, Check(ge=1)] = 1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Deep:
    inner: Inner = field(default_factory=Inner)
    rate: Annotated[float, Check(gt=0, le=1)] = 0.5


@dataclass(frozen=True)
class Conf:
    i: Annotated[int, Check(ge=0)] = 0
    f: Annotated[float, Check(gt=0)] = 1.0
    free: float = 0.0
    b: bool = False
    s: str = ""
    lit: Literal["x", "y"] = "x"
    nlit: Literal[0, 1, 3] = 0
    pair: Annotated[tuple[float, float], Check(ge=0, lt=1)] = (0.5, 0.5)
    ints: Annotated[tuple[int, ...], Check(ge=1, nonempty=True)] = (1,)
    floats: Annotated[tuple[float, ...], Check(gt=0)] = ()
    anyfloats: tuple[float, ...] = ()
    word: Annotated[str, Check(pattern=r"[a-z]+", means="lowercase letters")] = "abc"
    digits: Annotated[str, Check(pattern=r"[0-9]+")] = "1"
    two: Annotated[int, Check(ge=0), Check(lt=10)] = 0
    opt: int | None = None
    old_opt: Optional[float] = None  # noqa: UP045 (typing.Union, not types.UnionType)
    deep: Deep = field(default_factory=Deep)


def problems(**kw) -> list[str]:
    return field_problems(Conf(**kw))


def test_defaults_have_no_problems():
    assert field_problems(Conf()) == []
    assert field_problems(Spec()) == []


@pytest.mark.parametrize("kw,want", [
    # int
    ({"i": 3.0}, "i must be an integer, not 3.0"),
    ({"i": True}, "i must be an integer, not True"),
    ({"i": "3"}, "i must be an integer, not '3'"),
    ({"i": None}, "i must be an integer, not None"),
    # float (an int is a number)
    ({"f": math.nan}, "f must be a finite number, not nan"),
    ({"f": math.inf}, "f must be a finite number, not inf"),
    ({"f": -math.inf}, "f must be a finite number, not -inf"),
    ({"f": "x"}, "f must be a number, not 'x'"),
    ({"f": "1e-3"}, "f must be a number, not '1e-3'"),
    ({"f": False}, "f must be a number, not False"),
    ({"f": 10**400}, "f must be a finite number, not " + str(10**400)[:77] + "..."),  # too big for a float
    ({"free": math.nan}, "free must be a finite number, not nan"),  # no Check: still a finite number
    # bool
    ({"b": 1}, "b must be true or false, not 1"),
    ({"b": "false"}, "b must be true or false, not 'false'"),
    # str
    ({"s": 5}, "s must be a string, not 5"),
    # Literal
    ({"lit": "z"}, "lit must be one of x, y, not 'z'"),
    ({"nlit": 2}, "nlit must be one of 0, 1, 3, not 2"),
    ({"nlit": True}, "nlit must be one of 0, 1, 3, not True"),  # True == 1 but is no channel count
    ({"nlit": 1.0}, "nlit must be one of 0, 1, 3, not 1.0"),
    ({"nlit": "1"}, "nlit must be one of 0, 1, 3, not '1'"),
    # tuple[float, float]
    ({"pair": (0.5,)}, "pair must have 2 values, not (0.5,)"),
    ({"pair": (0.1, 0.2, 0.3)}, "pair must have 2 values, not (0.1, 0.2, 0.3)"),
    ({"pair": ()}, "pair must have 2 values, not ()"),
    ({"pair": ("a", 0.5)}, "pair must hold finite numbers, not ('a', 0.5)"),
    ({"pair": [0.5, 0.5]}, "pair must be a tuple, not [0.5, 0.5]"),
    ({"pair": 0.5}, "pair must be a tuple, not 0.5"),
    # tuple[int, ...]
    ({"ints": (1, 2.0)}, "ints must hold int values, not (1, 2.0)"),
    ({"ints": (1, True)}, "ints must hold int values, not (1, True)"),
    ({"ints": [1, 2]}, "ints must be a tuple, not [1, 2]"),
    # Union
    ({"opt": "x"}, "opt has the wrong type str, not 'x'"),
    ({"opt": 1.5}, "opt has the wrong type float, not 1.5"),
    ({"old_opt": "x"}, "old_opt has the wrong type str, not 'x'"),
])
def test_type_problems(kw: dict, want: str):
    assert problems(**kw) == [want]


@pytest.mark.parametrize("kw,want", [
    ({"i": -1}, "i must be >= 0, not -1"),
    ({"f": 0}, "f must be > 0, not 0"),
    ({"f": -0.0}, "f must be > 0, not -0.0"),
    ({"f": -1e-300}, "f must be > 0, not -1e-300"),
    ({"pair": (1.5, 0.5)}, "pair must each be in [0, 1), not (1.5, 0.5)"),
    ({"pair": (0.5, 1.0)}, "pair must each be in [0, 1), not (0.5, 1.0)"),
    ({"pair": (-0.1, 0.5)}, "pair must each be in [0, 1), not (-0.1, 0.5)"),
    ({"ints": (1, 0)}, "ints must each be >= 1, not (1, 0)"),
    ({"ints": ()}, "ints must not be empty, not ()"),
    ({"floats": (1.0, 0.0)}, "floats must each be > 0, not (1.0, 0.0)"),
    ({"floats": (-2,)}, "floats must each be > 0, not (-2,)"),
    ({"word": "ABC"}, "word must be lowercase letters, not 'ABC'"),
    ({"word": ""}, "word must be lowercase letters, not ''"),
    ({"word": "abc\n"}, "word must be lowercase letters, not 'abc\\n'"),  # the whole string must match
    ({"digits": "1a"}, "digits must be of the form [0-9]+, not '1a'"),  # no `means`: the pattern itself
    ({"two": -1}, "two must be >= 0, not -1"),  # every Check of a field applies
    ({"two": 10}, "two must be < 10, not 10"),
])
def test_value_problems(kw: dict, want: str):
    assert problems(**kw) == [want]


@pytest.mark.parametrize("kw", [
    {"i": 0, "f": 3, "free": -1e300, "b": True, "s": "", "lit": "y", "nlit": 3},
    {"pair": (0.0, 0.999), "ints": (1, 5, 100), "floats": (1, 2.5), "anyfloats": (-1.0, 0.0, 1e300)},
    {"floats": (), "anyfloats": (), "word": "z", "digits": "0123", "two": 9, "opt": 4, "old_opt": 1.5},
    {"pair": (0, -0.0)},  # ints are numbers, -0.0 >= 0
])
def test_valid_values_pass(kw: dict):
    assert problems(**kw) == []


def test_type_is_checked_before_bounds():
    """A wrong type gives the type message, not a bound message (and no exception comparing 'x' > 0)."""
    assert problems(f="-1") == ["f must be a number, not '-1'"]
    assert problems(ints=("0",)) == ["ints must hold int values, not ('0',)"]
    assert problems(word=5) == ["word must be a string, not 5"]  # not a pattern message, no TypeError from re


def test_nested_dataclasses_report_dotted_paths():
    assert problems(deep=Deep(inner=Inner(k=0))) == ["deep.inner.k must be >= 1, not 0"]
    assert problems(deep=Deep(inner=Inner(mode="c"))) == ["deep.inner.mode must be one of a, b, not 'c'"]
    assert problems(deep=Deep(rate=1.5)) == ["deep.rate must be in (0, 1], not 1.5"]
    assert field_problems(Deep(rate=0.0), prefix="top.") == ["top.rate must be in (0, 1], not 0.0"]


def test_a_dataclass_field_given_something_else():
    assert problems(deep=3) == ["deep must be a Deep, not 3"]
    assert problems(deep=Deep(inner={"k": 1})) == ["deep.inner must be a Inner, not {'k': 1}"]
    assert problems(deep=Inner()) == ["deep must be a Deep, not Inner(k=1, mode='a')"]


def test_every_problem_in_field_order():
    got = problems(i=-1, f="x", deep=Deep(inner=Inner(k=0), rate=2.0), ints=())
    assert got == ["i must be >= 0, not -1", "f must be a number, not 'x'", "ints must not be empty, not ()",
                   "deep.inner.k must be >= 1, not 0", "deep.rate must be in (0, 1], not 2.0"]


def test_one_problem_per_field():
    """A field with a wrong type and several Checks still gives one line."""
    assert problems(two=True) == ["two must be an integer, not True"]
    assert problems(pair=(5.0, 5.0)) == ["pair must each be in [0, 1), not (5.0, 5.0)"]


# ----------------------------------------------------------------------------- the real spec, exact text


@pytest.mark.parametrize("spec,want", [
    (Spec(optim=OptimSpec(betas=(1.5, 0.99))), "optim.betas must each be in [0, 1), not (1.5, 0.99)"),
    (Spec(optim=OptimSpec(lr="1e-3")), "optim.lr must be a number, not '1e-3'"),
    (Spec(train=TrainSpec(batch=12.0)), "train.batch must be an integer, not 12.0"),
    (Spec(train=TrainSpec(seed=2**31)), "train.seed must be in [0, 2147483648), not 2147483648"),
    (Spec(name="a/b"), "name must be a plain folder name (no slash or control character, not starting with a dot), not 'a/b'"),
    (Spec(optim=OptimSpec(lr=-1, eps=0)), "optim.lr must be >= 0, not -1 (and 1 more)"),
    (Spec(optim=OptimSpec(lr=-1, eps=0), train=TrainSpec(batch=0)), "optim.lr must be >= 0, not -1 (and 2 more)"),
])
def test_validate_exact_messages(spec: Spec, want: str):
    with pytest.raises(UserError) as e:
        validate(spec)
    assert str(e.value) == want


def test_message_is_one_line_even_for_a_multiline_repr():
    np = pytest.importorskip("numpy")
    (msg,) = problems(pair=np.zeros((2, 2)))
    assert "\n" not in msg and msg.endswith("not array([[0., 0.], [0., 0.]])"), msg
    (msg,) = problems(pair=np.zeros((40, 40)))
    assert "\n" not in msg and msg.endswith("...") and len(msg) < 160, msg
