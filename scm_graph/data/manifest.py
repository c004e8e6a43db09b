"""The manifest of a shard set: what the writer promises and the reader checks. No torch.

`<root>/<name>/manifest.json` names the shard files and their sizes, the image shape and dtype, the
per-channel statistics and the labels. The shard writer (`scm_graph.data.writer`) and the batch stream
(`scm_graph.data.stream`) both import this module, never each other.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scm_graph.errors import UserError
from scm_graph.spec import Spec

MANIFEST = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """The `manifest.json` of a shard set (written by `scm_graph.data.writer`)."""

    name: str
    count: int
    shape: tuple[int, int, int]
    dtype: str
    format: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    labels: bool
    class_names: tuple[str, ...] | None
    source: str
    shards: tuple[str, ...]
    shard_counts: tuple[int, ...] = field(default=())
    """Samples per shard (optional; checked while reading)."""
    shard_bytes: tuple[int, ...] = field(default=())
    """File size per shard (optional; checked by open_shards, catches truncated copies)."""

    @staticmethod
    def load(folder: str | Path) -> "Manifest":
        """Read and validate `<folder>/manifest.json`; one-line UserError if missing or invalid."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            what = "folder" if not folder.is_dir() else "manifest"
            raise UserError(f"shard set {folder} not found ({what} missing); {shard_hint(folder)}")
        try:
            d = json.loads(path.read_text())
            return _manifest_from_dict(d)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"invalid manifest {path} ({msg}); {shard_hint(folder, rewrite=True)}") from None

    def to_json(self) -> str:
        """The manifest as JSON text (what `load` reads)."""
        d: dict[str, Any] = {"version": VERSION}
        for k, v in self.__dict__.items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return json.dumps(d, indent=2) + "\n"


def shard_hint(folder: Path, rewrite: bool = False) -> str:
    """How to (re)write the shard set at `folder`."""
    name = folder.name
    src = name if name in ("digits", "cifar10") else f"folder --src DIR --resolution R --name {name}"
    if name == "cifar10":
        src = "cifar10 --src cifar-10-python.tar.gz"
    force = " --force" if rewrite else ""
    return f"run `python -m scm_graph.shard {src} --out {folder.parent}{force}`"


def _manifest_from_dict(d: dict[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON, raising ValueError/KeyError/TypeError on bad content."""
    if d.get("version") != VERSION:
        raise ValueError(f"unsupported version {d.get('version')!r}, expected {VERSION}")
    shape = tuple(int(s) for s in d["shape"])
    names = d.get("class_names")
    m = Manifest(
        name=str(d["name"]),
        count=int(d["count"]),
        shape=shape,  # type: ignore[arg-type]
        dtype=str(d["dtype"]),
        format=str(d["format"]),
        mean=tuple(float(v) for v in d["mean"]),
        std=tuple(float(v) for v in d["std"]),
        num_classes=int(d["num_classes"]),
        labels=bool(d["labels"]),
        class_names=None if names is None else tuple(str(n) for n in names),
        source=str(d["source"]),
        shards=tuple(str(s) for s in d["shards"]),
        shard_counts=tuple(int(c) for c in d.get("shard_counts", ())),
        shard_bytes=tuple(int(b) for b in d.get("shard_bytes", ())),
    )
    if len(shape) != 3 or min(shape) <= 0 or shape[0] not in (1, 3):
        raise ValueError(f"bad shape {list(shape)}")
    if m.dtype != "uint8" or m.format != "png":
        raise ValueError(f"unsupported dtype/format {m.dtype}/{m.format}")
    if len(m.mean) != shape[0] or len(m.std) != shape[0]:
        raise ValueError("mean/std need one value per channel")
    if m.count <= 0 or not m.shards or any("/" in s or s.startswith(".") for s in m.shards):
        raise ValueError("no samples or bad shard list")
    if m.labels != (m.num_classes > 0):
        raise ValueError("labels and num_classes disagree")
    for extra in (m.shard_counts, m.shard_bytes):
        if extra and len(extra) != len(m.shards):
            raise ValueError("shard_counts/shard_bytes must match shards")
    return m


def resolve_spec(spec: Spec, manifest: Manifest) -> Spec:
    """Fill the shape fields of `spec.data` from the shard set's manifest; one-line UserError on a mismatch."""
    d = spec.data
    shape = tuple(manifest.shape)  # (C, H, W)
    if d.resolution and d.resolution != shape[-1]:
        raise UserError(f"spec wants resolution {d.resolution} but shards {d.name} hold {shape[-1]}")
    if d.channels and d.channels != shape[0]:
        raise UserError(f"spec wants {d.channels} channels but shards {d.name} hold {shape[0]}")
    if spec.net.class_conditional and not manifest.num_classes:
        raise UserError(f"net.class_conditional needs labelled shards; {d.name} has no labels")
    d = dataclasses.replace(
        d,
        resolution=shape[-1],
        channels=shape[0],
        num_classes=d.num_classes or manifest.num_classes,
        mean=d.mean or tuple(float(m) for m in manifest.mean),
        std=d.std or tuple(float(s) for s in manifest.std),
    )
    return dataclasses.replace(spec, data=d)
