"""Sweep files: spec variants trained at one image budget over a few seeds, and the runs they make.

A sweep file is a small Python file, like the spec files in specs/, that defines `SWEEP = Sweep(...)`:

    from scm_graph.sweep import Sweep

    SWEEP = Sweep(
        base="specs/digits_sct.py",
        images=256_000,
        seeds=(0, 1),
        variants={
            "sct": [],
            "P_mean-0.8": ["--objective.P_mean", "-0.8"],
            "diffusion": ["specs/digits_diffusion.py"],
        },
    )

A variant is a list of arguments in the train CLI's syntax (`python -m scm_graph.train SPEC.py --a.b VALUE ...`):
an optional spec file first (else `base`), then `--section.field value` overrides, which follow the sweep's own
`args` (shared by every variant), so a variant's value wins. The sweep sets train.total_images, train.seed and
train.out of every run itself, so neither `args` nor a variant may. Paths are relative to the current folder,
as for the train CLI. Torch-free: the overrides are only parsed when the runs are checked (`sweep.check`).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scm_graph.errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a variant's name is the start of its runs' folder names
SET_BY_SWEEP = {"train.total_images": "images", "train.seed": "seeds", "train.out": "--out"}  # flag -> what sets it
NOT_AN_OVERRIDE = {"--resume", "--help", "-h"}  # the sweep decides --resume itself


@dataclass(frozen=True)
class Sweep:
    base: str
    """The spec file (specs/NAME.py) every variant starts from, unless its arguments name another first."""
    images: int
    """The image budget of every run (its train.total_images)."""
    variants: Mapping[str, Sequence[str]]
    """Variant name -> its arguments: [SPEC.py] --section.field VALUE ... Its runs go to <out>/<name>-s<seed>/."""
    seeds: Sequence[int] = (0,)
    """The train.seed of each run; every variant runs every seed."""
    args: Sequence[str] = ()
    """Overrides applied to every variant, before the variant's own (e.g. --train.precision bf16)."""
    out: str = ""
    """The sweep's folder; empty = runs/sweeps/<the sweep file's name>. `--out` overrides it."""


@dataclass(frozen=True)
class RunPlan:
    """One (variant, seed) run of a sweep: what to train and where."""

    variant: str
    seed: int
    spec_file: str
    overrides: tuple[str, ...] = field(repr=False)
    """The sweep's args, then the variant's."""
    images: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"

    def argv(self, resume: bool) -> list[str]:
        """The train CLI's arguments for this run (what follows `python -m scm_graph.train`); the sweep's own flags last."""
        return [self.spec_file, *self.overrides, "--train.total_images", str(self.images), "--train.seed", str(self.seed),
                "--train.out", str(self.folder), *(["--resume"] if resume else [])]


def read_sweep_file(path: str | Path) -> Sweep:
    """Import a sweep file and return its checked `SWEEP` (one-line UserError for anything wrong)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    loader_spec = importlib.util.spec_from_file_location(f"_scm_sweep_{path.stem}", path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"not a Python sweep file: {path}")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(path.parent.resolve())
    sys.path.insert(0, folder)  # a sweep file may import its siblings, as a spec file may
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # a broken sweep file is user input
        raise UserError(f"sweep file {path} failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise UserError(f"sweep file {path} must define SWEEP = Sweep(...)")
    check_sweep(sweep, str(path))
    return sweep


def _strings(v: object) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v)


def _flag(arg: str) -> str:
    """`--train.total-images=5` -> `train.total_images`; '' for a value."""
    return arg.split("=", 1)[0][2:].replace("-", "_") if arg.startswith("--") else ""


def _check_args(args: Sequence[str], what: str) -> None:
    for a in args:
        if a in NOT_AN_OVERRIDE:
            raise UserError(f"{what}: {a} is not allowed (the sweep resumes unfinished runs itself)")
        if _flag(a) in SET_BY_SWEEP:
            raise UserError(f"{what} sets --{_flag(a)}; the sweep sets it for every run (Sweep.{SET_BY_SWEEP[_flag(a)]})")


def check_sweep(s: Sweep, where: str) -> None:
    """Every field's type and range, and the flags a variant may not set; one-line UserError naming the field."""
    if not isinstance(s.base, str) or not s.base:
        raise UserError(f"{where}: base must be a spec file path, got {s.base!r}")
    if isinstance(s.images, bool) or not isinstance(s.images, int) or s.images < 1:
        raise UserError(f"{where}: images must be a positive integer (the image budget of each run), got {s.images!r}")
    seeds = s.seeds
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**31 for x in seeds)):
        raise UserError(f"{where}: seeds must be distinct integers in [0, 2**31), at least one, got {seeds!r}")
    if not _strings(s.args) or (s.args and not s.args[0].startswith("-")):
        raise UserError(f"{where}: args must be a list of --section.field VALUE overrides, got {s.args!r}")
    _check_args(s.args, f"{where}: args")
    if not isinstance(s.out, str):
        raise UserError(f"{where}: out must be a folder path (a string), got {s.out!r}")
    if not isinstance(s.variants, Mapping) or not s.variants:
        raise UserError(f"{where}: variants must be a dict of at least one name -> list of arguments")
    for name, args in s.variants.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{where}: variant name {name!r} must be letters, digits and _ . + - (it names a folder)")
        if not _strings(args):
            raise UserError(f"{where}: variant {name}: its arguments must be a list of strings, got {args!r}")
        _check_args(args, f"{where}: variant {name}")


def default_out(sweep: Sweep, path: str | Path) -> Path:
    """The sweep's folder: Sweep.out, else runs/sweeps/<the sweep file's name>."""
    return Path(sweep.out) if sweep.out else Path("runs/sweeps") / Path(path).stem


def plan(sweep: Sweep, out: Path, only: Sequence[str] = ()) -> list[RunPlan]:
    """The runs, seed by seed (every variant at the first seed, then the next seed), so a sweep stopped half way
    has compared every variant once; `only` keeps the named variants (an unknown name is a UserError)."""
    unknown = [n for n in only if n not in sweep.variants]
    if unknown:
        raise UserError(f"--only: no variant {unknown[0]!r} in the sweep (it has: {', '.join(sweep.variants)})")
    runs = []
    for seed in sweep.seeds:
        for name, args in sweep.variants.items():
            if only and name not in only:
                continue
            spec_file, rest = (args[0], args[1:]) if args and not args[0].startswith("-") else (sweep.base, args)
            runs.append(RunPlan(name, seed, spec_file, (*sweep.args, *rest), sweep.images, out / f"{name}-s{seed}"))
    return runs
