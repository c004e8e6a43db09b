"""`just bench step`: the table names the device and the precisions, one row per objective and precision."""

from __future__ import annotations

import torch

from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.common import device_name


def first_table(out: str) -> list[list[str]]:
    """The cells of the first markdown table's body rows (images/s per objective and precision)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| objective |")) + 2
    body = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split("|")])
    return body


def test_bench_step_table_names_precision_and_device(capsys):
    bench_main(["step", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--modes", "eager",
                "--precision", "fp32", "bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    dev = device_name(torch.device("cpu"))
    assert f"Device: {dev}" in out and "precision (autocast): fp32, bf16" in out
    rows = first_table(out)
    assert [(r[0], r[1]) for r in rows] == [("sct", "fp32"), ("sct", "bf16"), ("diffusion", "fp32"), ("diffusion", "bf16")]


def test_bench_step_of_an_scd_spec_times_the_scd_step(capsys):
    """`just bench step --spec specs/digits_scd.py`: the sCD step (with a frozen teacher and the guidance input)
    beside the diffusion step, and their ratio."""
    bench_main(["step", "--spec", "specs/digits_scd.py", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--modes", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [r[0] for r in first_table(out)] == ["scd", "diffusion"], out
    assert "| consistency step | mode | precision | sCD step time / diffusion step time |" in out
    assert "| scd | eager | fp32 |" in out


def test_bench_step_times_both_gradient_passes_and_the_host_decision(capsys):
    """`--fused-pass on off --host-read`: a row per gradient pass, each one's ratio to diffusion, and a table of
    each step with its update decided on the device against on the host."""
    bench_main(["step", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--modes", "eager",
                "--fused-pass", "on", "off", "--host-read", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [r[0] for r in first_table(out)] == ["sct, fused pass on", "sct, fused pass off", "diffusion"]
    assert "| sct, fused pass on | eager | fp32 |" in out and "| sct, fused pass off | eager | fp32 |" in out
    reads = [ln for ln in out.splitlines() if ln.startswith("| ") and ln.endswith("% |")]
    assert [ln.split("|")[1].strip() for ln in reads] == ["sct, fused pass on", "sct, fused pass off", "diffusion"]
