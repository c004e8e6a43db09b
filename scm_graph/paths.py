"""Output paths checked before the work that fills them, and files written whole or not at all.

Every CLI checks its outputs first (`output_file`, `output_dir`), so a bad path costs a second, not a
finished run. `write_atomic` writes a temp file beside the target and renames it, so a kill leaves
either the old file or the new one, and its OS errors are one line naming the path.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Callable, IO

from scm_graph.errors import UserError


def _writable_folder(folder: Path, flag: str) -> None:
    """Create `folder` (and parents) if needed; UserError unless it is a folder we can write into."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create folder {e.filename or folder}: {e.strerror or type(e).__name__}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: the folder is not writable")


def output_file(path: str | Path, suffixes: tuple[str, ...], flag: str) -> Path:
    """Check an output file before any work: its suffix, that it is not a folder, that its folder can be
    created and written, and that an existing file may be replaced. Creates the folder."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        want = " or ".join(suffixes)
        raise UserError(f"{flag} {path}: the file name must end in {want}")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a {suffixes[0]} file")
    _writable_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file exists and is not writable")
    return path


def output_dir(path: str | Path, flag: str) -> Path:
    """Check (and create) an output folder before any work."""
    path = Path(path)
    _writable_folder(path, flag)
    return path


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temp file beside `path`, then rename it over `path` (nothing half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_TEMP = re.compile(r"\..+\.tmp-([1-9][0-9]*)")  # write_atomic's temp names: .<name>.tmp-<pid>


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (ours counts; one we may not signal exists; unknown counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True
    return True


def remove_dead_temps(folder: str | Path, pattern: re.Pattern[str] = _TEMP) -> list[Path]:
    """Remove the regular files in `folder` whose name matches `pattern` (group 1: the writer's pid) and whose
    writer is gone; returns them. Best effort: a file that cannot be removed is skipped. Default: write_atomic's."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in sorted(entries, key=lambda e: e.name):
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        try:
            if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode) or pid_alive(int(m.group(1))):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(folder / entry.name)
    return removed
