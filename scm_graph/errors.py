"""One clear line and a non-zero exit for bad input, never a traceback wall."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap a CLI entry point: UserError -> `error: <msg>` on stderr and exit 2; an OSError -> one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            sys.stderr.write(f"error: {e}\n")  # one write: processes sharing a pipe (torchrun -u) never split a line
            sys.stderr.flush()
            raise SystemExit(2) from None
        except OSError as e:  # disk full, a folder made read-only mid-run, ...: one line naming the path
            where = f" {e.filename}" if e.filename is not None else ""
            print(f"error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line UserError."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)
