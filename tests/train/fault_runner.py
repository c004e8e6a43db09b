"""Run `python -m scm_graph.train` in this process and SIGKILL it at a chosen moment (fault injection).

    python tests/train/fault_runner.py MOMENT -- SPEC.py [train args ...]
    python -m tests.train.fault_runner MOMENT -- SPEC.py [train args ...]

MOMENT is `none` (run to the end) or `POINT:N`, the N-th hit (1-based, counted in this process) of POINT:

    start         before the first train step (after the checkpoint is loaded and the start line is written)
    step          just after the N-th train step returned (weights updated in memory, nothing logged yet)
    log-before    at the N-th metrics line (`Run.log`), before it is written
    log-after     at the N-th metrics line, after it is written and the file closed
    log-torn      at the N-th metrics line, after writing only its first half (no newline)
    ckpt-torn     in the N-th checkpoint write: half of the temp file's bytes written
    ckpt-write    in the N-th checkpoint write: the temp file complete (safetensors' own write), not renamed
    ckpt-rename   in the N-th checkpoint write: the temp file complete and synced, just before the rename
    ckpt-done     just after the N-th checkpoint's rename onto ckpt.safetensors
    grid          in the N-th sample grid: the samples generated, the PNG not yet written
    grid-done     just after the N-th sample grid's PNG was written
    eval          at the N-th FD evaluation: the FDs computed, not yet logged

The hooks monkeypatch the already-imported package (no sleeping, no timing): `TrainStep.__call__`,
`Run.log`, `safetensors.torch.save_file` and `os.replace` as scm_graph.checkpoint calls them (only for
the temp file / destination of `ckpt.safetensors`, so the digits classifier's cache is never hit),
`scm_graph.train.loop.save_grid` and `scm_graph.train.loop.evaluate_metrics`. Only the hook of the chosen point
is installed. Right before the kill one line `fault_runner: SIGKILL at POINT:N (...)` goes to stderr;
the exit status is then -9. A moment that is never reached lets the run finish normally (exit 0).

The run is deterministic as the golden-loss runs are: one intra-op thread here (the caller also sets
OMP_NUM_THREADS=1), and the caller passes `--train.compile false --train.precision fp32 --train.device cpu`.
"""

from __future__ import annotations

import json
import os
import signal
import sys

POINTS = ("start", "step", "log-before", "log-after", "log-torn", "ckpt-torn", "ckpt-write", "ckpt-rename",
          "ckpt-done", "grid", "grid-done", "eval")
KILLED = -signal.SIGKILL  # subprocess return code of a run killed here
CKPT_NAME = "ckpt.safetensors"
USAGE = "usage: python tests/train/fault_runner.py none|POINT:N -- SPEC.py [train args ...]"


def parse_moment(text: str) -> tuple[str, int] | None:
    """`none` -> None; `POINT:N` (or `start`) -> (POINT, N)."""
    if text == "none":
        return None
    point, _, n = text.partition(":")
    if point not in POINTS:
        raise SystemExit(f"fault_runner: unknown point {point!r}; one of {', '.join(POINTS)}\n{USAGE}")
    try:
        count = int(n or "1")
    except ValueError:
        raise SystemExit(f"fault_runner: bad count in {text!r}\n{USAGE}") from None
    if count < 1 or (point == "start" and count != 1):
        raise SystemExit(f"fault_runner: bad count in {text!r} (1-based; `start` happens once)")
    return point, count


def _die(point: str, n: int, detail: str = "") -> None:
    print(f"fault_runner: SIGKILL at {point}:{n}" + (f" ({detail})" if detail else ""), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _is_ckpt_tmp(filename: object) -> bool:
    return os.path.basename(os.fspath(filename)).startswith(CKPT_NAME + ".tmp-")


def install(point: str, n: int) -> None:
    """Patch the package so that the n-th hit of `point` kills this process."""
    import scm_graph.checkpoint as ckpt_mod
    from scm_graph.train import loop
    from scm_graph.train.step import TrainStep

    hits = 0

    def hit() -> bool:
        nonlocal hits
        hits += 1
        return hits == n

    if point in ("start", "step"):
        call = TrainStep.__call__

        def step_hook(self, inp, first=0, images=0):
            if point == "start" and hit():
                _die(point, n, "before the first train step")
            out = call(self, inp, first, images)
            if point == "step" and hit():
                _die(point, n, "after the train step")
            return out

        TrainStep.__call__ = step_hook

    elif point.startswith("log-"):
        log = loop.Run.log

        def log_hook(self, rec):
            if not hit():
                return log(self, rec)
            what = f"{rec.get('event', 'metrics')} line, images {rec.get('images')}"
            if point == "log-before":
                _die(point, n, what + ", not written")
            if point == "log-torn":
                line = json.dumps(rec) + "\n"
                with open(self.out / loop.METRICS, "a") as f:
                    f.write(line[: len(line) // 2])
                _die(point, n, what + ", half written")
            log(self, rec)
            _die(point, n, what + ", written")

        loop.Run.log = log_hook

    elif point in ("ckpt-torn", "ckpt-write"):
        st = ckpt_mod.safetensors.torch  # the module whose attribute scm_graph.checkpoint looks up
        save_file = st.save_file

        def save_file_hook(tensors, filename, metadata=None, *args, **kwargs):
            if not (_is_ckpt_tmp(filename) and hit()):
                return save_file(tensors, filename, metadata, *args, **kwargs)
            if point == "ckpt-write":
                save_file(tensors, filename, metadata, *args, **kwargs)
                _die(point, n, f"{os.path.basename(filename)} complete, not renamed")
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
            _die(point, n, f"{os.path.basename(filename)}: {len(data) // 2} of {len(data)} bytes")

        st.save_file = save_file_hook

    elif point in ("ckpt-rename", "ckpt-done"):
        real_os = ckpt_mod.os  # the global os module: patch only calls that land on ckpt.safetensors
        replace = real_os.replace

        def replace_hook(src, dst, *args, **kwargs):
            if not (os.path.basename(os.fspath(dst)) == CKPT_NAME and hit()):
                return replace(src, dst, *args, **kwargs)
            if point == "ckpt-rename":
                _die(point, n, f"{os.path.basename(os.fspath(src))} complete, before the rename")
            replace(src, dst, *args, **kwargs)
            _die(point, n, "after the rename")

        real_os.replace = replace_hook

    elif point in ("grid", "grid-done"):
        save_grid = loop.save_grid

        def grid_hook(images, path, *args, **kwargs):
            if point == "grid" and hit():
                _die(point, n, f"{os.path.basename(path)} not written")
            save_grid(images, path, *args, **kwargs)
            if point == "grid-done" and hit():
                _die(point, n, f"{os.path.basename(path)} written")

        loop.save_grid = grid_hook

    elif point == "eval":
        evaluate_metrics = loop.evaluate_metrics

        def eval_hook(*args, **kwargs):
            fd = evaluate_metrics(*args, **kwargs)
            if hit():
                _die(point, n, "FD computed, not logged")
            return fd

        loop.evaluate_metrics = eval_hook

    else:  # pragma: no cover - POINTS and the branches above go together
        raise AssertionError(point)


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") != 1:
        raise SystemExit(USAGE)
    moment, train_argv = parse_moment(argv[0]), argv[2:]
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py: Triton kernels (if any run) in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    if moment is not None:
        install(*moment)
    from scm_graph.train.cli import main as train_main

    train_main(train_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
