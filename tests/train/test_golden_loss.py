"""Golden-loss guard: the per-step losses of the first 50 steps of `digits_sct` and `digits_diffusion`.

Each run is the real CLI (`python -m scm_graph.train`) on freshly written digits shards, eager, fp32,
on the CPU with one thread, at the spec's own seed and batch, so the guard covers the data stream, the
draws of z / t / dropout keys, the model, the objective, the optimiser and the loop. A refactor must
reproduce `golden_losses.json` to the tolerance below (the same run with 2 threads instead of 1 moves
the losses by at most 5e-7 relative). A change that alters numerics on purpose regenerates the file,
in its own commit, saying why:

    python -m tests.train.test_golden_loss --write      (or: just golden)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_losses.json")
SPECS = ("digits_sct", "digits_diffusion")
STEPS = 50
RTOL, ATOL = 1e-5, 1e-6


def _batch(spec: str) -> int:
    """The spec file's own batch size (the runs use it unchanged)."""
    code = f"from scm_graph.specfile import read_spec_file; print(read_spec_file({str(REPO / 'specs' / spec)!r} + '.py').train.batch)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout)


def golden_losses(spec: str, shard_root: Path, out: Path) -> list[float]:
    """Per-step losses of the first STEPS steps of `specs/<spec>.py` (eager, fp32, CPU, one thread)."""
    batch = _batch(spec)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scm_graph.train", f"specs/{spec}.py", "--train.compile", "false",
           "--train.precision", "fp32", "--train.device", "cpu", "--train.total_images", str(STEPS * batch),
           "--train.log_every_images", str(batch), "--train.eval_samples", "64",
           "--data.root", str(shard_root), "--train.out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return [r["loss"] for r in steps]


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_golden_losses(spec: str, tmp_path: Path, shard_root: Path, scm_cache: Path) -> None:
    want = json.loads(GOLDEN.read_text())["losses"][spec]
    got = golden_losses(spec, shard_root, tmp_path / spec)
    assert len(want) == STEPS
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{spec}: losses moved from {GOLDEN.name}")


def write_golden() -> None:
    """Regenerate golden_losses.json with the code as it is now."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "shards"
        subprocess.run([sys.executable, "-m", "scm_graph.shard", "digits", "--out", str(root)], check=True, cwd=REPO,
                       capture_output=True)
        losses = {spec: golden_losses(spec, root, Path(d) / spec) for spec in SPECS}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    doc = {
        "what": f"per-step training loss of the first {STEPS} steps (eager, fp32, CPU, 1 thread, spec seed and batch)",
        "regenerate": "python -m tests.train.test_golden_loss --write",
        "written_at": rev, "torch": torch.__version__, "machine": platform.machine(),
        "losses": losses,
    }
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.train.test_golden_loss --write")
    write_golden()
