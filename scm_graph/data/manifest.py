"""The manifest of a shard set: what the writer promises and the reader checks. No torch.

`<root>/<name>/manifest.json` names the shard files and their sizes, the image shape and dtype, the
per-channel statistics and the labels. Pixel sets store PNGs (`format` "png", uint8); latent sets
(`format` "npy", float16 / float32) store SD-VAE latents and describe them in `latent` (`LatentInfo`). The shard writer (`scm_graph.data.writer`) and the batch stream
(`scm_graph.data.stream`) both import this module, never each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from scm_graph.errors import UserError
from scm_graph.spec import Spec

MANIFEST = "manifest.json"
VERSION = 1
CHECKSUM = "sha256"
"""The per-sample checksum: the member name in each sample and the manifest's `sample_checksum`."""


LATENT_STORED = ("mean_std", "mean")


@dataclass(frozen=True)
class LatentInfo:
    """How a latent shard set was encoded: the `latent` object of its manifest.

    Each sample's `npy` member holds the VAE posterior in raw (unscaled) latent units: [2C, h, w] = the mean
    then the std when `stored` is "mean_std" (EDM2), [C, h, w] = the mean alone when "mean". The manifest's
    `shape` is the training latent's [C, h, w]; its mean / std are the per-channel statistics of the latents
    training draws (mean + std * eps for "mean_std": var = var(mean) + E[std^2]).
    """

    vae: str
    """The diffusers AutoencoderKL folder that encoded the set (absolute path, as given when sharding)."""
    scaling_factor: float
    """The VAE's `scaling_factor` (SD-VAE: 0.18215), recorded for reference; stored latents are unscaled."""
    stored: str
    """"mean_std" or "mean" (see above)."""
    image_resolution: int
    """Side of the images that were encoded (512 for ImageNet 512)."""


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
    sample_checksum: str | None = None
    """"sha256": every sample holds a `sha256` member (see `sample_digest`); None for older sets."""
    latent: LatentInfo | None = None
    """Latent sets: how they were encoded; None for pixel sets."""

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
        """The manifest as JSON text (what `load` reads); no `sample_checksum` key when there is none."""
        d: dict[str, Any] = {"version": VERSION}
        for k, v in self.__dict__.items():
            if k not in ("sample_checksum", "latent") or v is not None:
                d[k] = dataclasses.asdict(v) if k == "latent" else list(v) if isinstance(v, tuple) else v
        return json.dumps(d, indent=2) + "\n"


def sample_digest(sample: Mapping[str, Any]) -> str:
    """The `sha256` member of a sample: 16 hex digits over its other payloads, sorted by name, with names and sizes."""
    h = hashlib.sha256()
    for name in sorted(k for k in sample if not k.startswith("__") and k != CHECKSUM):
        data = bytes(sample[name])
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def shard_hint(folder: Path, rewrite: bool = False) -> str:
    """How to (re)write the shard set at `folder`."""
    name = folder.name
    src = name if name in ("digits", "cifar10") else f"folder --src DIR --resolution R --name {name}"
    if name.startswith("imagenet"):
        vae = " --vae VAE_FOLDER" if name.endswith("-sdvae") else ""
        src = f"imagenet --src IMAGENET_DIR --resolution R{vae} --name {name}"
    if name == "cifar10":
        src = "cifar10 --src cifar-10-python.tar.gz"
    if name in ("digits-train", "digits-heldout"):
        src = f"digits --split {name.removeprefix('digits-')}"
    force = " --force" if rewrite else ""
    return f"run `python -m scm_graph.shard {src} --out {folder.parent}{force}`"


# ---------------------------------------------------------------------------------------------
# Validation: each check names the field and the bad value


REQUIRED = ("name", "count", "shape", "dtype", "format", "mean", "std", "num_classes", "labels", "class_names",
            "source", "shards")
OPTIONAL = ("version", "shard_counts", "shard_bytes", "sample_checksum", "latent")
FORMATS = {"png": ("uint8",), "npy": ("float16", "float32")}
"""Sample format -> the dtypes it may hold."""


def _show(v: Any) -> str:
    """A JSON value as it appears in the file, cut to 80 characters."""
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _is_int(v: Any) -> bool:
    """A JSON integer (not a float like 3.0, a string or a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict[str, Any], key: str, least: int) -> int:
    """d[key] as an integer >= least."""
    v = d[key]
    if not _is_int(v) or v < least:
        raise ValueError(f"{key} must be an integer >= {least}, not {_show(v)}")
    return v


def _str(d: dict[str, Any], key: str) -> str:
    """d[key] as a string."""
    if not isinstance(d[key], str):
        raise ValueError(f"{key} must be a string, not {_show(d[key])}")
    return d[key]


def _ints(d: dict[str, Any], key: str, n: int) -> tuple[int, ...]:
    """d[key] (optional) as n positive integers, one per shard; () when absent."""
    v = d.get(key, [])
    if key in d and not (isinstance(v, list) and len(v) == n and all(_is_int(x) and x > 0 for x in v)):
        raise ValueError(f"{key} must be a list of {n} positive integers (one per shard), not {_show(v)}")
    return tuple(v)


def _stats(d: dict[str, Any], key: str, channels: int, positive: bool) -> tuple[float, ...]:
    """d[key] as one finite number per channel (> 0 when positive)."""
    v = d[key]
    ok = isinstance(v, list) and len(v) == channels and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in v)
    if not ok:
        what = f"finite number{'s' if channels > 1 else ''}" + (" > 0" if positive else "")
        raise ValueError(f"{key} must be a list of {channels} {what} (one per channel), not {_show(v)}")
    return tuple(float(x) for x in v)


def _shape(d: dict[str, Any], latent: bool) -> tuple[int, int, int]:
    """[channels, height, width] with positive sizes; 1 or 3 channels for a pixel set."""
    v = d["shape"]
    if not (isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v) and (latent or v[0] in (1, 3))):
        want = "[channels, height, width] with " + ("positive sizes" if latent else "1 or 3 channels and positive sizes")
        raise ValueError(f"shape must be {want}, not {_show(v)}")
    return (v[0], v[1], v[2])


def _latent(d: dict[str, Any], fmt: str) -> LatentInfo | None:
    """The `latent` object: required for (and only for) an "npy" set."""
    v = d.get("latent")
    if fmt != "npy":
        if v is not None:
            raise ValueError(f"latent must be absent for a {fmt} set, not {_show(v)}")
        return None
    keys = {f.name for f in dataclasses.fields(LatentInfo)}
    if not (isinstance(v, dict) and set(v) == keys):
        raise ValueError(f"latent must be an object with {', '.join(sorted(keys))}, not {_show(v)}")
    if not isinstance(v["vae"], str) or not v["vae"]:
        raise ValueError(f"latent.vae must be a folder path, not {_show(v['vae'])}")
    sf = v["scaling_factor"]
    if not (isinstance(sf, (int, float)) and not isinstance(sf, bool) and math.isfinite(sf) and sf > 0):
        raise ValueError(f"latent.scaling_factor must be a number > 0, not {_show(sf)}")
    if v["stored"] not in LATENT_STORED:
        raise ValueError(f"latent.stored must be one of {', '.join(LATENT_STORED)}, not {_show(v['stored'])}")
    if not _is_int(v["image_resolution"]) or v["image_resolution"] <= 0:
        raise ValueError(f"latent.image_resolution must be a positive integer, not {_show(v['image_resolution'])}")
    return LatentInfo(v["vae"], float(sf), v["stored"], v["image_resolution"])


def _shards(d: dict[str, Any]) -> tuple[str, ...]:
    """A non-empty list of unique plain file names ending in .tar."""
    v = d["shards"]
    if not isinstance(v, list) or not v:
        raise ValueError(f"shards must be a non-empty list of shard file names, not {_show(v)}")
    for s in v:
        if not isinstance(s, str) or "/" in s or "\\" in s or "\0" in s or s.startswith(".") or not s.endswith(".tar"):
            raise ValueError(f"shards: {_show(s)} is not a plain file name ending in .tar")
    dup = next((s for i, s in enumerate(v) if s in v[:i]), None)
    if dup is not None:
        raise ValueError(f"shards: {_show(dup)} is listed twice")
    return tuple(v)


def _labels(d: dict[str, Any]) -> tuple[bool, int, tuple[str, ...] | None]:
    """(labels, num_classes, class_names), consistent with each other."""
    labels, num_classes, names = d["labels"], _int(d, "num_classes", 0), d["class_names"]
    if not isinstance(labels, bool):
        raise ValueError(f"labels must be true or false, not {_show(labels)}")
    if labels != (num_classes > 0):
        raise ValueError(f"labels is {_show(labels)} but num_classes is {num_classes}")
    if not labels:
        if names is not None:
            raise ValueError(f"class_names must be null for an unlabelled set, not {_show(names)}")
        return False, 0, None
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        raise ValueError(f"class_names must be a list of {num_classes} strings (num_classes), not {_show(names)}")
    return True, num_classes, tuple(names)


def _manifest_from_dict(d: Any) -> Manifest:
    """Build a Manifest from parsed JSON, raising ValueError on bad content (the message names field and value)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, not {_show(d)}")
    if d.get("version") != VERSION or not _is_int(d.get("version")):
        raise ValueError(f"unsupported version {d.get('version')!r}, expected {VERSION}")
    unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field {_show(unknown[0])}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"missing field {missing[0]}")
    dtype, fmt = _str(d, "dtype"), _str(d, "format")
    if fmt not in FORMATS:
        raise ValueError(f"format must be {' or '.join(map(json.dumps, FORMATS))}, not {_show(fmt)}")
    if dtype not in FORMATS[fmt]:
        raise ValueError(f"dtype must be {' or '.join(map(json.dumps, FORMATS[fmt]))} in a {fmt} set, not {_show(dtype)}")
    latent = _latent(d, fmt)
    shape = _shape(d, latent is not None)
    labels, num_classes, names = _labels(d)
    count, shards = _int(d, "count", 1), _shards(d)
    counts = _ints(d, "shard_counts", len(shards))
    if counts and sum(counts) != count:
        raise ValueError(f"shard_counts add up to {sum(counts)}, but count is {count}")
    checksum = d.get("sample_checksum")
    if checksum not in (None, CHECKSUM):
        raise ValueError(f"sample_checksum must be \"{CHECKSUM}\" or null, not {_show(checksum)}")
    return Manifest(
        name=_str(d, "name"),
        count=count,
        shape=shape,
        dtype=dtype,
        format=fmt,
        mean=_stats(d, "mean", shape[0], positive=False),
        std=_stats(d, "std", shape[0], positive=True),
        num_classes=num_classes,
        labels=labels,
        class_names=names,
        source=_str(d, "source"),
        shards=shards,
        shard_counts=counts,
        shard_bytes=_ints(d, "shard_bytes", len(shards)),
        sample_checksum=checksum,
        latent=latent,
    )


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
    if spec.net.class_conditional and d.num_classes and d.num_classes < manifest.num_classes:  # a label with no embedding row
        raise UserError(f"spec wants {d.num_classes} classes but shards {d.name} hold {manifest.num_classes}")
    if manifest.latent is not None and d.normalize != "channel":
        raise UserError(f"shards {d.name} hold VAE latents: set data.normalize to 'channel' (per-channel mean / std)")
    if manifest.latent is None and d.vae:
        raise UserError(f"data.vae is set but shards {d.name} hold pixels, not VAE latents")
    d = dataclasses.replace(
        d,
        vae=d.vae or (manifest.latent.vae if manifest.latent else ""),
        resolution=shape[-1],
        channels=shape[0],
        num_classes=d.num_classes or manifest.num_classes,
        mean=d.mean or tuple(float(m) for m in manifest.mean),
        std=d.std or tuple(float(s) for s in manifest.std),
    )
    return dataclasses.replace(spec, data=d)
