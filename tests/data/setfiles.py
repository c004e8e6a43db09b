"""Reading a shard set with tarfile + PIL + hashlib only (an independent reference for the writer's output)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def digest(payloads: dict[str, bytes]) -> str:
    """The writer's per-sample checksum, written out again: sha256 over (name NUL size NUL bytes) in name order, 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(payloads):
        h.update(name.encode() + b"\0" + str(len(payloads[name])).encode() + b"\0" + payloads[name])
    return h.hexdigest()[:16]


def read_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes} over all shards of the set, in order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


def read_set(folder: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(manifest json, key -> uint8 CHW image, key -> label); checks each sample's members and its sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    images: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for key, members in read_members(folder).items():
        assert set(members) == ({"png", "cls", "sha256"} if manifest["labels"] else {"png", "sha256"}), (key, set(members))
        assert members.pop("sha256").decode() == digest(members), key
        arr = np.asarray(Image.open(io.BytesIO(members["png"])))
        images[key] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if "cls" in members:
            labels[key] = int(members["cls"].decode("ascii"))
    return manifest, images, labels
