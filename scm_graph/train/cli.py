"""`python -m scm_graph.train specs/NAME.py [--resume] [--ignore-checksum] [--field.sub value ...]` (or `just train`).

Every value is checked (`scm_graph.spec.validate`) and the run folder is checked before anything is
built; progress shows as a bar on a terminal and as a plain line every `--train.progress_every_s`
seconds otherwise (`--train.progress bar|lines|off` to choose).

Under torchrun (`torchrun --nproc_per_node N -m scm_graph.train SPEC.py ...`) every process runs this;
rank 0 prints, and a failure anywhere stops every process with one line each (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from scm_graph.checkpoint import read_metadata
from scm_graph.data.manifest import resolve_spec
from scm_graph.data.stream import open_shards
from scm_graph.errors import UserError, cli_main, first_line
from scm_graph.model import check_net
from scm_graph.spec import Spec, spec_from_json, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from scm_graph.train import parallel
from scm_graph.train.distill import check_teacher
from scm_graph.train.loop import CKPT, is_eval_key, train


@dataclass(frozen=True)
class Args:
    spec: Spec
    """The resolved, checked spec."""
    out: Path
    resume: bool
    verify: bool
    """Check checkpoint checksums on load (off with --ignore-checksum)."""


def parse_args(argv: list[str]) -> Args:
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print("usage: python -m scm_graph.train SPEC.py [--resume] [--ignore-checksum] [--field.sub VALUE ...]\n"
              "       python -m scm_graph.train SPEC.py --help   (every field with its help text)")
        raise SystemExit(0 if argv else 2)
    path, rest = argv[0], argv[1:]
    if path.startswith("-"):
        raise UserError(f"the first argument must be a spec file, got {path}")
    resume, verify = "--resume" in rest, "--ignore-checksum" not in rest
    rest = [a for a in rest if a not in ("--resume", "--ignore-checksum")]
    spec = apply_overrides(read_spec_file(path), rest, prog=f"python -m scm_graph.train {path}")
    validate(spec)  # every value, before the shards are opened
    spec = resolve_spec(spec, open_shards(spec.data))
    validate(spec)  # and the values the manifest filled in
    check_net(spec)
    if spec.train.init_from and not resume:
        read_metadata(spec.train.init_from, verify=verify)  # a bad path fails before the run folder exists
    o = spec.objective
    if o.kind == "scd" and o.teacher_kind == "trigflow":  # the teacher's spec against the student's, before any work
        check_teacher(spec_from_json(read_metadata(o.teacher, verify=verify)["spec"]), spec, o.teacher)
    return Args(spec, Path(spec.train.out or f"runs/{spec.name}"), resume, verify)


class Stopped(Exception):
    """torchrun stopped this process (SIGTERM), because another process of the job failed."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped()


@cli_main
def main(argv: list[str] | None = None) -> None:
    if not parallel.under_torchrun():
        run(sys.argv[1:] if argv is None else argv)
        return
    # torchrun: one line per process, naming the rank; torchrun's own report of the failed process follows
    rank = int(os.environ["RANK"])
    signal.signal(signal.SIGTERM, _stop)
    finished = False
    try:
        run(sys.argv[1:] if argv is None else argv, main=rank == 0)
        finished = True
    except UserError as e:
        raise UserError(f"rank {rank}: {e}") from None
    except Stopped:
        raise UserError(f"rank {rank}: stopped, because another process of the job failed; "
                        "the last checkpoint on disk is kept") from None
    except RuntimeError as e:  # a collective failed: another process died or cannot be reached
        if not parallel.lost_contact(e):
            raise
        raise UserError(f"rank {rank}: lost the other processes of the job ({first_line(e)[:200]}); "
                        "the last checkpoint on disk is kept") from None
    finally:
        parallel.leave(collect=finished)


def run(argv: list[str], main: bool = True) -> None:
    a = parse_args(argv)
    spec, out = a.spec, a.out
    summary = train(spec, out, resume=a.resume, verify=a.verify)
    if main:
        fds = "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if is_eval_key(k))
        print(f"done: {summary['images']} images in {summary['wall_s']:.0f} s -> {out / CKPT}  {fds}")

