"""`just bench attention`: the table has one row per method and size, and the methods agree."""

from __future__ import annotations

import pytest

from scm_graph.bench.attention import run
from scm_graph.bench.cli import main as bench_main


def test_rows_agree_with_the_fused_op():
    import torch

    rows = run([16, 33], [16], bh=4, heads=2, dtype=torch.float32, dev=torch.device("cpu"), reps=1, warmup=0, max_math_n=16)
    names = [r.method for r in rows if r.n == 16]
    assert names[:2] == ["fused", "math"] and names[-4:] == ["fused fwd", "sdpa fwd", "fused fwd+bwd", "sdpa fwd+bwd"]  # (jfa between)
    by = {(r.method, r.n): r for r in rows}
    assert by["math", 16].max_err < 1e-5 and by["math", 16].tflops > 0  # math JVP vs fused op, fp32
    assert by["sdpa fwd", 33].max_err < 1e-5  # torch's forward vs the fused kernel's forward, fp32
    assert by["fused fwd", 33].tflops > 0 and by["fused fwd", 33].max_err == 0
    assert by["sdpa fwd+bwd", 33].max_err < 1e-5 and by["fused fwd+bwd", 33].tflops > 0  # SDPA's gradients vs the op's, fp32
    math33 = by["math", 33]
    assert math33.note.startswith("skipped") and math33.ms != math33.ms  # N > max_math_n: not run


def test_cli_appends_a_table(tmp_path, capsys):
    out = tmp_path / "b.md"
    args = ["attention", "--n", "8", "--head-dim", "16", "--bh", "2", "--heads", "1", "--reps", "1", "--warmup", "0", "--out", str(out)]
    bench_main(args)
    bench_main(args)
    text = out.read_text()
    assert text.count("# Attention forward + JVP") == 2 and "| 16 | 8 | fused |" in text and "| 16 | 8 | sdpa fwd |" in text
    with pytest.raises(SystemExit) as e:
        bench_main(["attention", "--bh", "3", "--heads", "2"])
    assert e.value.code == 2 and "multiple of --heads" in capsys.readouterr().err


def test_a_failing_method_is_a_row_not_a_lost_table(monkeypatch):
    import torch

    from scm_graph.bench import attention as ba

    methods = ba._methods()

    def broken(*args):
        raise RuntimeError("a || b went wrong")

    monkeypatch.setattr(ba, "_methods", lambda: {**methods, "jfa": ba.Method(broken, 12.0, "fused")})
    rows = run([8], [16], bh=2, heads=1, dtype=torch.float32, dev=torch.device("cpu"), reps=1, warmup=0, max_math_n=64)
    jfa = next(r for r in rows if r.method == "jfa")
    assert jfa.note.startswith("failed: RuntimeError: a || b") and jfa.ms != jfa.ms
    assert all(r.ms == r.ms for r in rows if r.method != "jfa")  # the others still ran
    table = ba.to_markdown(rows, "cpu", "fp32", 2, 1)
    assert "failed: RuntimeError: a \\|\\| b" in table  # pipes escaped: the table keeps its columns


def test_gradient_error_is_the_worst_of_dq_dk_dv_each_on_its_own_scale():
    """dK of a small scale beside large dQ and dV: its error must show (1e-1), not vanish in their scale (1e-5)."""
    import torch

    from scm_graph.bench.attention import max_error

    ref = torch.stack([torch.full((2, 3), 100.0), torch.full((2, 3), -100.0), torch.full((2, 3), 0.01)])
    out = ref.clone()
    out[2, 1, 1] += 1e-3
    assert abs(max_error(out, ref, gradients=True) - 0.1) < 1e-4
    assert max_error(out, ref, gradients=False) < 2e-5
    assert max_error(ref, ref, gradients=True) == 0.0
