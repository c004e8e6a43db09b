"""`just bench attention`: the table has one row per method and size, and the methods agree."""

from __future__ import annotations

import pytest

from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.attention import run


def test_rows_agree_with_the_fused_op():
    import torch

    rows = run([16, 33], [16], bh=4, heads=2, dtype=torch.float32, dev=torch.device("cpu"), reps=1, warmup=0, max_math_n=16)
    assert [(r.method, r.n) for r in rows] == [("fused", 16), ("math", 16), ("fused", 33), ("math", 33)]
    assert rows[1].max_err < 1e-5 and rows[1].tflops > 0  # math JVP vs fused op, fp32
    assert rows[3].note.startswith("skipped") and rows[3].ms != rows[3].ms  # N > max_math_n: not run


def test_cli_appends_a_table(tmp_path, capsys):
    out = tmp_path / "b.md"
    args = ["attention", "--n", "8", "--head-dim", "16", "--bh", "2", "--heads", "1", "--reps", "1", "--warmup", "0", "--out", str(out)]
    bench_main(args)
    bench_main(args)
    text = out.read_text()
    assert text.count("# Attention forward + JVP") == 2 and "| 16 | 8 | fused |" in text
    with pytest.raises(SystemExit) as e:
        bench_main(["attention", "--bh", "3", "--heads", "2"])
    assert e.value.code == 2 and "multiple of --heads" in capsys.readouterr().err
