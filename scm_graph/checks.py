"""Valid values written next to a config field's definition, checked in one walk over the dataclass tree.

    lr: Annotated[float, Check(gt=0)] = 1e-4

`field_problems(obj)` walks a (nested) frozen dataclass and returns one line per bad value: a value of
the wrong type (a spec file is Python, so anything can arrive), a float that is not finite, a number
outside its bounds, a string outside its pattern, an empty tuple that must not be empty, or a value
outside a `Literal[...]` choice set. Numbers in tuples are checked one by one. No torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Check:
    """Bounds and shape of a field's valid values (None = no bound)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False
    """A tuple needs at least one entry."""
    pattern: str | None = None
    """A string must match this regular expression in full."""
    means: str = ""
    """How the pattern reads in an error message (e.g. 'a plain folder name')."""

    def describe(self) -> str:
        """The bounds in words: 'in [0, 1)', '> 0', '>= 1'."""
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo and hi:
            return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        if hi:
            return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        return ""

    def number_ok(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def _num(v: float | None) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _checks(hint: Any) -> tuple[Any, list[Check]]:
    """(the bare type, the Check annotations) of a field's type hint."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return base, [m for m in meta if isinstance(m, Check)]
    return hint, []


def _type_problem(v: Any, tp: Any) -> str | None:
    """Why `v` is not a `tp` (int, float, bool, str, Literal, tuple[...]), or None."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return None if isinstance(v, bool) else "must be true or false"
    if tp is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "must be a number"
        return None if abs(v) <= math.nextafter(math.inf, 0) else "must be a finite number"  # max float; an int too big for a float is not finite either
    if tp is str:
        return None if isinstance(v, str) else "must be a string"
    if origin is Literal:
        choices = typing.get_args(tp)
        ok = any(type(v) is type(c) and v == c for c in choices)  # the type first: no array truth values
        return None if ok else f"must be one of {', '.join(map(str, choices))}"
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, tuple):
            return "must be a tuple"
        if len(args) == 2 and args[1] is Ellipsis:
            elems = [args[0]] * len(v)
        elif len(v) != len(args):
            return f"must have {len(args)} values"
        else:
            elems = list(args)
        for x, t in zip(v, elems):
            if _type_problem(x, t):
                if typing.get_origin(t) is Literal:
                    return f"must hold only {', '.join(map(str, typing.get_args(t)))}"
                return "must hold finite numbers" if t is float else f"must hold {getattr(t, '__name__', t)} values"
        return None
    if origin in (typing.Union, types.UnionType):
        return None if any(v is None if t is type(None) else _type_problem(v, t) is None for t in typing.get_args(tp)) else f"has the wrong type {type(v).__name__}"
    return None  # types this walk does not know are left to their users


def _value_problem(v: Any, tp: Any, check: Check) -> str | None:
    """Why `v` breaks `check`, or None."""
    if check.nonempty and isinstance(v, tuple) and not v:
        return "must not be empty"
    if check.pattern is not None and isinstance(v, str) and not re.fullmatch(check.pattern, v):
        return f"must be {check.means or 'of the form ' + check.pattern}"
    bounds = check.describe()
    if bounds:
        nums = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, (int, float)) and not isinstance(x, bool) and not check.number_ok(x) for x in nums):
            return f"must {'each ' if isinstance(v, tuple) else ''}be {bounds}"
    return None


def field_problems(obj: Any, prefix: str = "") -> list[str]:
    """One line per bad value in the dataclass tree `obj`: '<path> must be > 0, not -1'."""
    out: list[str] = []
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        tp, checks = _checks(hints[f.name])
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, tp):
                out.append(f"{name} must be a {tp.__name__}, not {v!r}")
            else:
                out += field_problems(v, name + ".")
            continue
        problem = _type_problem(v, tp)
        for c in checks:
            if problem:
                break
            problem = _value_problem(v, tp, c)
        if problem:
            out.append(f"{name} {problem}, not {_show(v)}")
    return out


def _show(v: Any) -> str:
    """A value as the user typed it: 1.5, (1.5, 0.99), 'x'."""
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    text = " ".join(repr(v).split())  # one line, whatever the value's repr (a numpy array spans several)
    return text if len(text) <= 80 else text[:77] + "..."
