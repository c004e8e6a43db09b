"""The package layout: imports follow the data flow, no import circles, torch-free where promised, and
nothing in the repository points at a file outside it.

The flow, bottom to top (a module may import its own rank or lower, never higher):
    utilities (errors, checks, paths, progress, device, precision) -> ops -> spec -> specfile, trigflow -> data -> shard (the data CLI)
    -> nets -> model -> objectives -> train.step, train.ema -> checkpoint -> sample -> eval
    -> the runners that compose everything: train.loop, train.cli, bench, report, sweep.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PKG = REPO / "scm_graph"

RANKS = {  # longest matching prefix wins
    "scm_graph": 0, "scm_graph.errors": 0, "scm_graph.device": 0, "scm_graph.precision": 0, "scm_graph.checks": 0,
    "scm_graph.paths": 0, "scm_graph.progress": 0,
    "scm_graph.ops": 1,
    "scm_graph.spec": 2,
    "scm_graph.specfile": 3, "scm_graph.trigflow": 3,
    "scm_graph.data": 4,
    "scm_graph.shard": 5,
    "scm_graph.nets": 6,
    "scm_graph.model": 7, "scm_graph.teacher": 7,
    "scm_graph.objectives": 8,
    "scm_graph.train": 9, "scm_graph.train.step": 9, "scm_graph.train.ema": 9, "scm_graph.train.parallel": 9,
    "scm_graph.checkpoint": 10,
    "scm_graph.sample": 11,
    "scm_graph.eval": 12,
    "scm_graph.train.loop": 13, "scm_graph.train.meter": 13, "scm_graph.train.rundir": 13, "scm_graph.train.distill": 13, "scm_graph.train.cli": 13, "scm_graph.train.__main__": 13, "scm_graph.bench": 13,
    "scm_graph.diagnose": 13, "scm_graph.report": 13, "scm_graph.sweep": 13,
}

# Beyond the ranks: what the contract names explicitly.
FORBIDDEN = [
    ("scm_graph.spec", "scm_graph.nets"), ("scm_graph.data", "scm_graph.train"), ("scm_graph.nets", "scm_graph.objectives"),
    ("scm_graph.sample", "scm_graph.objectives"), ("scm_graph.sample", "scm_graph.train"),
    ("scm_graph.eval", "scm_graph.objectives"),
    *[("scm_graph.eval", f"scm_graph.train.{m}") for m in ("loop", "step", "cli", "ema", "meter", "rundir", "distill")],  # train.parallel only
    ("scm_graph.checkpoint", "scm_graph.objectives"), ("scm_graph.checkpoint", "scm_graph.train"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every scm_graph module `path` imports, at any depth of its code."""
    modules = {module_name(p) for p in PKG.rglob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules  # `from scm_graph import trigflow`
            out |= subs if subs else {node.module}
    return {m for m in out if m in modules and m != module_name(path)}


def rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


GRAPH = {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_rank():
    assert all(rank(m) >= 0 for m in GRAPH)
    assert len(GRAPH) > 40  # the walk found the package


def test_imports_follow_the_flow():
    bad = [f"{m} (rank {rank(m)}) imports {d} (rank {rank(d)})" for m, deps in GRAPH.items() for d in sorted(deps)
           if rank(d) > rank(m)]
    assert not bad, bad


@pytest.mark.parametrize("low,high", FORBIDDEN)
def test_forbidden_imports(low: str, high: str):
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps
           if (m == low or m.startswith(low + ".")) and (d == high or d.startswith(high + "."))]
    assert not bad, bad


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError(" -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", ["scm_graph.data.manifest", "scm_graph.data.writer", "scm_graph.shard", "scm_graph.spec",
                                    "scm_graph.checks", "scm_graph.paths"])
def test_torch_free_modules(module: str):
    """The manifest, the shard writer and its CLI, and the spec load without torch (a quick shard CLI, no GPU stack)."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_nothing_points_outside_the_repository():
    """Every design reference is docs/design.md, inside the repository."""
    outside = ("DESIGN" + ".md", "../" + "shared", "seeds" + "/0")
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    hits = []
    for f in files:
        p = REPO / f
        if p.suffix in {".py", ".md", ".toml", ".txt", ".json", ""} and p.is_file():
            text = p.read_text(errors="replace")
            hits += [f"{f}: {needle}" for needle in outside if needle in text]
    assert not hits, hits
    assert (REPO / "docs" / "design.md").is_file()
