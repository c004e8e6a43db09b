"""`just bench step`: the table names the device and the precisions, one row per objective and precision."""

from __future__ import annotations

import torch

from scm_graph.bench.cli import main as bench_main
from scm_graph.bench.common import device_name


def test_bench_step_table_names_precision_and_device(capsys):
    bench_main(["step", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--modes", "eager",
                "--precision", "fp32", "bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    dev = device_name(torch.device("cpu"))
    assert f"Device: {dev}" in out and "precision (autocast): fp32, bf16" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("| sct |", "| diffusion |"))]
    assert [ln.split("|")[2].strip() for ln in rows] == ["fp32", "bf16", "fp32", "bf16"]


def test_bench_step_of_an_scd_spec_times_the_scd_step(capsys):
    """`just bench step --spec specs/digits_scd.py`: the sCD step (with a frozen teacher and the guidance input)
    beside the diffusion step, and their ratio."""
    bench_main(["step", "--spec", "specs/digits_scd.py", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--modes", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith(("| scd |", "| diffusion |", "| sct |"))]
    assert rows == ["scd", "diffusion"], out
    assert "| mode | precision | sCD step time / diffusion step time |" in out
