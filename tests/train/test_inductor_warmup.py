"""The vector-ISA check the CPU train step starts in the background (scm_graph.train.inductor_warmup)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scm_graph.model import build_model
from scm_graph.train import inductor_warmup
from scm_graph.train.step import TrainStep
from tests.helpers import tiny_spec


def _python(code: str, cache_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter (an empty Inductor cache folder if given), checked to exit 0."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)} if cache_dir else None
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture
def fresh(monkeypatch):
    """No check started yet in this process, and Inductor's check replaced by a recorder."""
    calls: list[str] = []
    done = threading.Event()

    def fake_check() -> list:
        calls.append(threading.current_thread().name)
        done.set()
        return ["an ISA"]

    from torch._inductor import cpu_vec_isa

    monkeypatch.setattr(inductor_warmup, "_thread", None)
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", fake_check)
    return calls, done


def test_check_runs_once_off_the_main_thread(fresh):
    calls, done = fresh
    first = inductor_warmup.start_vec_isa_check()
    assert first is not None and first.daemon
    assert done.wait(10)
    first.join(10)
    assert inductor_warmup.start_vec_isa_check() is first  # a second step in the process starts nothing new
    assert calls == ["inductor-vec-isa-check"]


def test_a_failing_check_stays_in_its_thread(fresh, monkeypatch):
    from torch._inductor import cpu_vec_isa

    def broken() -> list:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", broken)
    seen: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    thread = inductor_warmup.start_vec_isa_check()
    thread.join(10)
    assert not thread.is_alive() and seen == []  # Inductor makes the check again at compile time


@pytest.mark.parametrize("compile", [True, False])
def test_cpu_step_starts_the_check_only_when_it_compiles(monkeypatch, compile: bool):
    started: list[bool] = []
    monkeypatch.setattr(inductor_warmup, "start_vec_isa_check", lambda: started.append(True))
    spec = tiny_spec()
    TrainStep(build_model(spec), spec, compile=compile)  # building compiles nothing yet
    assert started == ([True] if compile else [])


def test_the_wait_pass_joins_the_check_before_code_generation(fresh, monkeypatch):
    """The step's CPU compile options hold the pass; Inductor runs it on a fresh compile, and it returns only after
    the background check has finished (the check must not run twice at once)."""
    import torch
    from torch._inductor import cpu_vec_isa

    from scm_graph.train.step import step_compile_options

    release, finished = threading.Event(), threading.Event()

    def blocked_check() -> list:  # finishes only once the pass has started waiting
        release.wait(30)
        finished.set()
        return []  # Inductor's codegen uses this answer: scalar kernels

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", blocked_check)
    seen: list[tuple[bool, bool]] = []  # (finished when the pass began, finished when it returned)
    original = inductor_warmup.WaitForVecIsaCheck.__call__

    def watched(self, graph) -> None:
        before = finished.is_set()
        threading.Timer(0.2, release.set).start()
        original(self, graph)
        seen.append((before, finished.is_set()))

    monkeypatch.setattr(inductor_warmup.WaitForVecIsaCheck, "__call__", watched)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no scalar-kernel warning here
    options = step_compile_options("cpu")
    assert isinstance(options["post_grad_custom_post_pass"], inductor_warmup.WaitForVecIsaCheck)
    assert "post_grad_custom_post_pass" not in step_compile_options("cuda", triton_release=(3, 8))

    inductor_warmup.start_vec_isa_check()
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            f = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True, options=options)
            x = torch.randn(5)
            assert torch.allclose(f(x), torch.sin(x) * 2 + 1)
    finally:
        release.set()
    assert seen and seen[0] == (False, True)


def test_an_inductor_without_the_check_starts_nothing(monkeypatch):

    monkeypatch.setattr(inductor_warmup, "_thread", None)
    monkeypatch.setitem(sys.modules, "torch._inductor.cpu_vec_isa", None)  # importing it raises ImportError
    assert inductor_warmup.start_vec_isa_check() is None
    inductor_warmup.WaitForVecIsaCheck()(None)  # nothing to wait for


@pytest.mark.parametrize(("isa_list", "capability", "vec_isa_ok", "warns"), [
    ([], "AVX2", None, True),
    ([], "AVX512", None, True),
    (["an ISA"], "AVX512", None, False),
    ([], "DEFAULT", None, False),  # no vector ISA in ATen either (or ATEN_CPU_CAPABILITY=default)
    ([], "AVX2", False, False),  # the user turned Inductor's vectors off
])
def test_scalar_fallback_warning(isa_list, capability, vec_isa_ok, warns):
    message = inductor_warmup.scalar_fallback_warning(isa_list, capability, vec_isa_ok)
    assert (message is not None) == warns
    if warns:
        assert capability in message and "scalar" in message and "\n" not in message


def test_an_empty_check_warns_from_its_thread(fresh, monkeypatch):
    import warnings

    import torch
    from torch._inductor import cpu_vec_isa

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", list)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inductor_warmup.start_vec_isa_check().join(10)
    assert [w.category for w in caught] == [RuntimeWarning] and "scalar" in str(caught[0].message)


@pytest.mark.slow
def test_a_check_whose_child_python_fails_warns():
    """End to end, with Inductor's real check: its child Python cannot start (as when a module named like a
    standard-library one crashed it), so every ISA fails and Inductor would write scalar kernels."""
    import platform

    import torch

    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("the check has vector ISAs to fail only on an x86 CPU with AVX2 or AVX-512")
    code = ("import sys; from scm_graph.train import inductor_warmup as w; sys.executable = '/bin/false'; "
            "w.start_vec_isa_check().join(120)")
    run = _python(code)
    assert "RuntimeWarning" in run.stderr and "will be scalar" in run.stderr


@pytest.mark.slow
def test_data_workers_fork_while_the_check_runs(tmp_path):
    """The train loop's first batch forks the DataLoader's workers right after the step has started the check thread.
    With Inductor's real check running (a fresh cache folder: it compiles its test programs, several seconds) across
    the whole fork, the workers start and deliver the same batches as no workers do."""
    import json
    import platform
    import textwrap

    import torch

    from scm_graph.data.digits import digits_source
    from scm_graph.data.writer import write_set

    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("the check builds test programs (seconds, so it spans the fork) only on an x86 CPU with AVX2 or AVX-512")
    write_set(digits_source(), tmp_path / "shards", shard_size=500, progress=False)
    code = textwrap.dedent(f"""
        import json
        from itertools import islice
        import torch
        from scm_graph.data.stream import batches
        from scm_graph.spec import DataSpec
        from scm_graph.train import inductor_warmup

        def take(workers):
            spec = DataSpec(name="digits", root={str(tmp_path / "shards")!r}, workers=workers, shuffle_buffer=200)
            return [b.x0 for b in islice(batches(spec, 0.5, 32, 0), 4)]

        ref = take(0)
        thread = inductor_warmup.start_vec_isa_check()
        alive_before = thread.is_alive()
        got = take(2)
        alive_after = thread.is_alive()
        thread.join(120)
        same = len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, got))
        print(json.dumps({{"alive": [alive_before, alive_after], "same": same, "finished": not thread.is_alive()}}))
    """)
    run = _python(code, tmp_path / "inductor")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["alive"] == [True, True], "the check ended before the workers had forked: nothing was tested"
    assert result["same"] and result["finished"]


@pytest.mark.slow
def test_the_check_imports_nothing_in_its_thread(tmp_path):
    """After `import_for_check` on the calling thread, Inductor's real check (an empty cache folder: it builds its test
    programs) imports no module, so the thread never imports beside the main thread's Dynamo imports."""
    import json

    code = ("import json, sys; from scm_graph.train import inductor_warmup as w; check = w.import_for_check(); "
            "before = set(sys.modules); check(); print(json.dumps(sorted(set(sys.modules) - before)))")
    run = _python(code, tmp_path / "inductor")
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
