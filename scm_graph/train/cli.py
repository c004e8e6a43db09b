"""`python -m scm_graph.train specs/NAME.py [--resume] [--field.sub value ...]` (or `just train`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from scm_graph.data.manifest import resolve_spec
from scm_graph.data.stream import open_shards
from scm_graph.errors import UserError, cli_main
from scm_graph.model import check_net
from scm_graph.spec import Spec, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from scm_graph.train.loop import CKPT, train


def parse_args(argv: list[str]) -> tuple[Spec, Path, bool]:
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print("usage: python -m scm_graph.train SPEC.py [--resume] [--field.sub VALUE ...]\n"
              "       python -m scm_graph.train SPEC.py --help   (every field with its help text)")
        raise SystemExit(0 if argv else 2)
    path, rest = argv[0], argv[1:]
    if path.startswith("-"):
        raise UserError(f"the first argument must be a spec file, got {path}")
    resume = "--resume" in rest
    rest = [a for a in rest if a != "--resume"]
    spec = apply_overrides(read_spec_file(path), rest, prog=f"python -m scm_graph.train {path}")
    manifest = open_shards(spec.data)
    spec = resolve_spec(spec, manifest)
    validate(spec)
    check_net(spec)
    out = Path(spec.train.out or f"runs/{spec.name}")
    return spec, out, resume


@cli_main
def main(argv: list[str] | None = None) -> None:
    spec, out, resume = parse_args(sys.argv[1:] if argv is None else argv)
    summary = train(spec, out, resume=resume, progress=sys.stderr.isatty() or os.environ.get("SCM_PROGRESS") == "1")
    fds = "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("fd_"))
    print(f"done: {summary['images']} images in {summary['wall_s']:.0f} s -> {out / CKPT}  {fds}")

