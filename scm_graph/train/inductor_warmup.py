"""Inductor's one-time check of the CPU's vector instructions, started in the background.

Before Inductor writes its first C++ kernel it checks which vector ISA the CPU and compiler support. For each
candidate (AVX-512, AVX2, ...) it compiles a small test program and loads it in a subprocess
(`torch._inductor.cpu_vec_isa.valid_vec_isa_list`). The answer lands in the Inductor cache, so only an empty cache pays.
On a 2-core box that is about 7 s of waiting on the compiler, in the middle of code generation, while the second core
is idle. The train step starts the check in a thread when it is built. It then runs while Dynamo and AOTAutograd
trace the step, about 15 s of single-threaded Python for `digits_sct`. Its first compiled step on an empty cache went
from 84 s to 79 s, the mean of three runs each (docs/bench_step_cpu.md, "The vector-ISA check in the background").

Inductor caches the answer in-process, so the check runs once. A caller that comes before the thread has finished
makes the same check again: the compile is slower, not different. The test programs are built under a file lock, and
the second caller then finds them built.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

_thread: threading.Thread | None = None


def _check(valid_vec_isa_list: Callable[[], list]) -> None:
    with contextlib.suppress(Exception):  # Inductor repeats a failed check at compile time and reports it there
        valid_vec_isa_list()


def start_vec_isa_check() -> threading.Thread | None:
    """Start Inductor's vector-ISA check in a daemon thread, once per process. Returns the thread, or None where this
    Inductor has no such check (then the compile makes its own, if any)."""
    global _thread
    if _thread is not None:
        return _thread
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:
        return None
    _thread = threading.Thread(target=_check, args=(valid_vec_isa_list,), name="inductor-vec-isa-check", daemon=True)
    _thread.start()
    return _thread
