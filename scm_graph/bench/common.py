"""What the benchmarks share: naming the device, waiting for it, appending a result table to a file under docs/."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU model and the thread count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer sees finished work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def append_table(path: str | Path, table: str) -> None:
    """Append a markdown table (and a blank line) to `path`: one file can collect several runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(table + "\n")
