"""Inductor's one-time check of the CPU's vector instructions, started in the background.

Before Inductor writes its first C++ kernel it checks which vector ISA (AVX-512, AVX2, ...) the CPU and compiler
support. For each candidate it compiles a small test program and loads it in a child Python
(`torch._inductor.cpu_vec_isa.valid_vec_isa_list`). The programs are kept in the Inductor cache folder; the loads run
in every process. On a 2-core box the check takes about 6 s with an empty cache, in the middle of code generation,
while the second core is idle.

The CPU train step starts the check in a thread when it is built (`start_vec_isa_check`). The check then runs while
Dynamo and AOTAutograd trace the first call, about 17 s of single-threaded Python for `digits_sct`. Its first compiled
step on an empty cache went from 82.2 s to 78.1 s, the mean of three runs each (docs/bench_step_cpu.md, "The
vector-ISA check in the background").

The check is not safe to run twice at once. Inductor caches its answer in-process, but a second caller that arrives
while the first is still running makes the check again. Some of the checks change a shared ISA object's compiler flags
and then restore them (the AVX-512 bf16 and AMX-fp16 ones). So the step's compiled functions also run
`WaitForVecIsaCheck`, an Inductor post-grad pass. It joins the thread before Inductor lowers the graph, and so before
Inductor's own first call of the check, which comes at code generation. On a hit in Inductor's FX graph cache the
passes do not run, and loading the cached kernels calls the check; by then a warm check (about 1 s of loads) has had
Dynamo's whole trace to finish. If it has not, the flags the two calls could leave behind are ones the CPU has, since
those checks run only on CPUs that report the feature.

When the check finds no vector ISA, Inductor writes scalar C++ kernels and says nothing; on the 2-core box the
`digits_sct` step was then 16% slower. That happened there when a file named `nt.py` sat beside the script: the
check's child Python, started with the parent's module path, crashed. So the thread warns when the check comes back
empty on a CPU whose ATen kernels use AVX2 or AVX-512 (`scalar_fallback_warning`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

_thread: threading.Thread | None = None


def scalar_fallback_warning(isa_list: list, cpu_capability: str, vec_isa_ok: bool | None) -> str | None:
    """The warning for a check that found no vector ISA on a CPU that has one, else None. `cpu_capability` is ATen's
    (`torch.backends.cpu.get_cpu_capability()`: "AVX2", "AVX512", ..., or "DEFAULT", also where a user set
    ATEN_CPU_CAPABILITY=default); `vec_isa_ok` is Inductor's `cpp.vec_isa_ok` (False: the user turned vectors off)."""
    if isa_list or vec_isa_ok is False or cpu_capability.upper() in ("", "DEFAULT"):
        return None
    return (f"Inductor's check found no usable vector instructions on this {cpu_capability} CPU, so its compiled CPU "
            "kernels will be scalar and the train step slower (16% for digits_sct on a 2-core box). The check builds "
            "a test program and loads it in a child Python; a module on the path named like a standard-library one "
            "(such as nt.py) has made that child crash.")


def _check(valid_vec_isa_list: Callable[[], list]) -> None:
    try:
        isa_list = valid_vec_isa_list()
    except Exception:  # noqa: BLE001
        return  # Inductor makes the check again at compile time, failing or not as it does there
    message = scalar_fallback_warning(isa_list, torch.backends.cpu.get_cpu_capability(),
                                      getattr(inductor_config.cpp, "vec_isa_ok", None))
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=1)


def import_for_check() -> Callable[[], list] | None:
    """Import, on the calling thread, every module the check imports, and return the check (None where this Inductor
    has none). The thread must import nothing: CPython 3.11's imports are not safe against a module that edits
    `sys.meta_path` while another thread imports. The check's C++ build imports `torch.utils.cpp_extension`, hence
    setuptools, whose distutils shim inserts and removes a finder there; a main thread importing Dynamo's modules at
    that moment can skip the path finder and fail with ModuleNotFoundError (seen once here in some 80 process starts,
    on `torch.fx.passes._tensorify_python_scalars`)."""
    try:
        import torch._inductor.codecache
        import torch._inductor.cpp_builder
        import torch.utils.cpp_extension  # noqa: F401
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:
        return None
    return valid_vec_isa_list


def start_vec_isa_check() -> threading.Thread | None:
    """Start Inductor's vector-ISA check in a daemon thread, once per process. Returns the thread, or None where this
    Inductor has no such check (then the compile makes its own, if any)."""
    global _thread
    if _thread is not None:
        return _thread
    valid_vec_isa_list = import_for_check()
    if valid_vec_isa_list is None:
        return None
    _thread = threading.Thread(target=_check, args=(valid_vec_isa_list,), name="inductor-vec-isa-check", daemon=True)
    _thread.start()
    return _thread


class WaitForVecIsaCheck(CustomGraphPass):
    """Inductor post-grad pass that changes no graph: it waits for the background check to finish (see above). Its uuid
    is a constant, so the FX graph cache stays on and an edit of this file does not invalidate it."""

    def __call__(self, graph: Graph) -> None:
        if _thread is not None:
            _thread.join()

    def uuid(self) -> bytes:
        return b"scm_graph.train.inductor_warmup.WaitForVecIsaCheck/1"  # a no-op on graphs: bump only if that changes


COMPILE_OPTIONS = {"post_grad_custom_post_pass": WaitForVecIsaCheck()}
