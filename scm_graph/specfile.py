"""Spec files and their command-line overrides: the tyro plumbing around the data in `scm_graph.spec`.

`read_spec_file("specs/NAME.py")` imports the file and returns its `SPEC`; `apply_overrides(spec, args)`
applies `--section.field value` flags with tyro. Every bad input is a one-line `UserError`; `--help`
lists every field with its help text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import sys
import typing
from pathlib import Path
from typing import Annotated

import tyro

from scm_graph.errors import UserError
from scm_graph.spec import LEGACY_NET_FIELDS, Spec


def read_spec_file(path: str | Path) -> Spec:
    """Import `specs/NAME.py` and return its `SPEC`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    mod_name = f"_scm_spec_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"not a Python spec file: {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.path.insert(0, str(path.parent.resolve()))  # a spec may import its sibling specs
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # a broken spec file is user input
        raise UserError(f"spec file {path} failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, Spec):
        raise UserError(f"spec file {path} must define SPEC = Spec(...)")
    return spec


_BOOL_WORDS = {"true": "True", "false": "False", "yes": "True", "no": "False", "on": "True", "off": "False"}


def apply_overrides(spec: Spec, args: list[str], prog: str = "scm_graph.train") -> Spec:
    """Apply `--field.sub value` overrides with tyro; one-line UserError on bad input.

    `--help` prints every field with its help text and exits 0.
    """
    _refuse_legacy_flags(args)
    bool_flags = _bool_flags(Spec)
    args = [_BOOL_WORDS.get(a.lower(), a) if i and args[i - 1] in bool_flags else a for i, a in enumerate(args)]
    args = [_bool_word_after_equals(a, bool_flags) for a in args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(
                Spec,
                default=spec,
                args=args,
                prog=prog,
                config=(tyro.conf.FlagConversionOff,),
            )
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UserError(_first_tyro_line(err.getvalue()) or f"bad arguments: {' '.join(args)}") from None


def _bool_word_after_equals(arg: str, bool_flags: set[str]) -> str:
    """`--train.compile=false` -> `--train.compile=False` (tyro spells bools True / False)."""
    flag, eq, word = arg.partition("=")
    return f"{flag}={_BOOL_WORDS.get(word.lower(), word)}" if eq and flag in bool_flags else arg


def _bool_flags(cls: type, prefix: str = "") -> set[str]:
    """`--a.b` and `--a-b` spellings of every bool field, so `--train.compile false` works."""
    flags: set[str] = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        name, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            flags |= _bool_flags(hint, name + ".")
        elif typing.get_origin(hint) is Annotated and typing.get_args(hint)[0] is bool or hint is bool:
            flags |= {f"--{name}", f"--{name.replace('_', '-')}"}
            for meta in getattr(hint, "__metadata__", ()):
                flags |= set(getattr(meta, "aliases", None) or ())
    return flags


def _first_tyro_line(text: str) -> str:
    """tyro draws a titled box; keep its first paragraph (wrapped lines joined) as one line."""
    parts: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("│"):
            if parts:
                break
            continue
        s = line.strip("│ ").strip()
        if not s or set(s) == {"─"}:
            if parts:
                break
            continue
        parts.append(s)
    return " ".join(parts)


def _refuse_legacy_flags(args: list[str]) -> None:
    """A flat network flag of scm_graph 0.1 (`--net.channels`) is an error naming its new place."""
    for a in args:
        if not a.startswith("--net."):
            continue
        old = a.split("=", 1)[0].removeprefix("--net.").replace("-", "_")
        if old in LEGACY_NET_FIELDS:
            where = " or ".join(f"--net.{n}" for n in LEGACY_NET_FIELDS[old])
            raise UserError(f"--net.{old} moved to the network's own section: use {where}")
