"""Checkpoints: one safetensors file with JSON metadata (never pickle).

A checkpoint holds everything to resume training exactly (weights, EMA, optimizer state, RNG states,
counters) and the resolved spec, so it alone rebuilds the model. Layout: tensors under `net.`, `ema.`,
`optim.state.<param_index>.<key>`, `rng.<name>` (and `optim.ref.<n>` for the rare tensor nested
elsewhere in the optimizer state); metadata keys `format`, `spec`, `step`, `images`,
`optim_param_groups`, `optim_scalars`, `grad_scaler` (fp16 loss-scaler state; absent in older files)
and `meta` (JSON strings). Files of an older format version are read and brought to today's
parameter names (`READABLE`); files are always written in the newest.

Checksums (format 3 on; formats 1 and 2 have none and load unverified). `tensor_sha256` is a JSON object
mapping every tensor's name to `tensor_checksum(t)`: the first 32 hex digits of the SHA-256 of
`json.dumps([dtype, shape])` (dtype as torch names it without `torch.`, e.g. `["bfloat16", [3, 4]]`),
a newline, then the tensor's raw little-endian bytes, exactly the bytes of its data region in the file.
`metadata_sha256` is the first 32 hex digits of the SHA-256 of
`json.dumps(<every other metadata key -> value>, sort_keys=True, separators=(",", ":"))` as UTF-8, so it
covers the spec, the counters, the optimizer scalars and `tensor_sha256` itself. Loading verifies both
unless asked not to (the CLIs' `--ignore-checksum`); a format-3 file without them is corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from scm_graph.errors import UserError, first_line
from scm_graph.paths import remove_dead_temps

FORMAT = "scm_graph.checkpoint/3"
_FORMAT_FAMILY = "scm_graph.checkpoint/"
# Version 1 (scm_graph 0.1) named the networks' conditioning layers differently; the parameter order,
# hence the optimizer state's indices, is unchanged. Prefixes of model parameter names, old -> new.
_V1_RENAMES = (
    ("net.map_label.", "net.emb.label."),
    ("net.map_guidance.", "net.emb.guidance."),
    ("net.map0.", "net.emb.fc0."),
    ("net.map1.", "net.emb.fc1."),
)
# format -> the renames that bring it to today's names
READABLE = {"scm_graph.checkpoint/1": _V1_RENAMES, "scm_graph.checkpoint/2": (), FORMAT: ()}
_UNCHECKED = frozenset({"scm_graph.checkpoint/1", "scm_graph.checkpoint/2"})  # formats written without checksums
TENSOR_SUMS = "tensor_sha256"
METADATA_SUM = "metadata_sha256"
_SUM_HEX = 32  # hex digits kept of each SHA-256 (128 bits)
_IGNORE_HINT = "pass --ignore-checksum to load it anyway"


def tensor_checksum(t: torch.Tensor) -> str:
    """Checksum of a tensor's dtype, shape and data (see the module docstring); hashes in place, no copy
    for a contiguous CPU tensor. Works for every dtype (bytes are read through a uint8 view)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256(json.dumps([str(t.dtype).removeprefix("torch."), list(t.shape)]).encode() + b"\n")
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:_SUM_HEX]


def metadata_checksum(md: dict[str, str]) -> str:
    """Checksum of every metadata value but `metadata_sha256` itself (see the module docstring)."""
    rest = {k: v for k, v in md.items() if k != METADATA_SUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:_SUM_HEX]


def _rename(state: dict[str, torch.Tensor], renames: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """`state` with each name that starts with an old prefix moved to the new one."""
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


@dataclass
class Checkpoint:
    spec_json: str
    """Resolved spec (`scm_graph.spec.spec_to_json`)."""
    step: int
    images: int
    """Images seen."""
    net: dict[str, torch.Tensor]
    """Training weights (state dict of the trained module)."""
    ema: dict[str, torch.Tensor] | None = None
    """EMA weights, same keys as `net`."""
    optim: dict[str, Any] | None = None
    """A `torch.optim.Optimizer.state_dict()`."""
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named RNG states (uint8 CPU tensors)."""
    scaler: dict[str, float | int] | None = None
    """`torch.amp.GradScaler.state_dict()` of an fp16 run (plain numbers: scale, growth tracker, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra JSON-able info."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj`: tuples tagged, tensors moved into `tensors` as `optim.ref.<n>`."""
    if isinstance(obj, torch.Tensor):
        name = f"optim.ref.{sum(k.startswith('optim.ref.') for k in tensors)}"
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _encode(v, tensors) for k, v in obj.items()}
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, none sharing storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        c = t.detach().to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in seen or c.untyped_storage().nbytes() != c.nbytes:
            c = c.clone()
        seen.add(c.untyped_storage().data_ptr())
        out[k] = c
    return out


def _pack(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten a checkpoint into safetensors tensors + string metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in (("net.", ckpt.net), ("ema.", ckpt.ema or {}), ("rng.", ckpt.rng)):
        for k, v in sd.items():
            tensors[prefix + k] = v
    groups: Any = None
    scalars: dict[str, dict[str, Any]] = {}
    if ckpt.optim is not None:
        for idx, state in ckpt.optim.get("state", {}).items():
            scalars[str(idx)] = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.state.{int(idx)}.{k}"] = v
                else:
                    scalars[str(idx)][k] = _encode(v, tensors)
        groups = _encode(ckpt.optim.get("param_groups", []), tensors)
    metadata = {
        "format": FORMAT,
        "spec": ckpt.spec_json,
        "step": str(int(ckpt.step)),
        "images": str(int(ckpt.images)),
        "optim_param_groups": json.dumps(groups),
        "optim_scalars": json.dumps(scalars),
        "grad_scaler": json.dumps(ckpt.scaler),
        "meta": json.dumps(ckpt.meta),
    }
    tensors = _storable(tensors)
    metadata[TENSOR_SUMS] = json.dumps({k: tensor_checksum(t) for k, t in tensors.items()}, sort_keys=True)
    metadata[METADATA_SUM] = metadata_checksum(metadata)
    return tensors, metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (temp file + fsync + rename); never clobber other files."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write checkpoint {path}: it is a folder")
    if path.exists():
        try:
            fmt = _raw_metadata(path).get("format", "")
        except UserError:
            fmt = ""
        if not fmt.startswith(_FORMAT_FAMILY):
            raise UserError(f"refusing to overwrite {path}: it exists and is not an scm_graph checkpoint")
    tensors, metadata = _pack(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; best effort
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temp files that `save_checkpoint(path, ...)` left behind when killed between writing and
    renaming: regular files named exactly `<path.name>.tmp-<pid>` in path's folder whose writer `<pid>`
    is no longer running. Files of live processes (this one included), and anything else, are left
    alone. Returns the removed paths (best effort: one that cannot be removed is skipped)."""
    path = Path(path)
    return remove_dead_temps(path.parent, re.compile(re.escape(path.name) + r"\.tmp-([1-9][0-9]*)"))


def _raw_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of `path` (UserError if missing or not safetensors)."""
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise UserError(f"checkpoint {path} is not a safetensors file ({first_line(e)})") from None


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"checkpoint {path} is corrupt: {what}; {_IGNORE_HINT}")


def _checked(md: dict[str, str]) -> bool:
    """Whether the file carries checksums to verify: format 3 on, or any file with checksum metadata (so a
    flipped format digit cannot pass a format-3 file off as an unverifiable format-2 one)."""
    return md["format"] not in _UNCHECKED or METADATA_SUM in md or TENSOR_SUMS in md


def _tensor_sums(path: Path, md: dict[str, str]) -> dict[str, str]:
    """The per-tensor checksums of a format-3 file whose metadata checksum has been checked."""
    try:
        sums = json.loads(md[TENSOR_SUMS])
    except ValueError:
        sums = None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise _corrupt(path, f"its {TENSOR_SUMS!r} metadata is not a table of checksums")
    return sums


def read_metadata(path: str | Path, verify: bool = True) -> dict[str, str]:
    """Header metadata of an scm_graph checkpoint, without loading tensors. With `verify` (and a format
    with checksums) the metadata is checked against its checksum: cheap, no tensor is read or hashed."""
    path = Path(path)
    md = _raw_metadata(path)
    if md.get("format") not in READABLE:
        found = f" (format {md['format']!r}, expected one of {', '.join(READABLE)})" if "format" in md else ""
        raise UserError(f"checkpoint {path} has no scm_graph metadata{found}")
    if verify and _checked(md):
        missing = [k for k in (METADATA_SUM, TENSOR_SUMS) if k not in md]
        if len(missing) == 2:
            raise _corrupt(path, f"it carries no checksums (every {md['format']} file does)")
        if missing:
            raise _corrupt(path, f"its {missing[0]!r} metadata is missing")
        if md[METADATA_SUM] != metadata_checksum(md):
            raise _corrupt(path, "its metadata does not match its checksum")
        _tensor_sums(path, md)
    return md


def _json(path: Path, md: dict[str, str], key: str) -> Any:
    try:
        return json.loads(md[key])
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path}: corrupt metadata {key!r} ({first_line(e)})") from None


def _read_tensors(path: Path, md: dict[str, str], verify: bool):
    """Yield (name, CPU tensor) for each tensor of `path`, one at a time; with `verify` (format 3) each is
    checked against its checksum as it is read, and the file's names against the checksummed ones."""
    sums = _tensor_sums(path, md) if verify and _checked(md) else None
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            names = list(f.keys())
        except Exception as e:
            raise UserError(f"checkpoint {path}: cannot read tensors ({first_line(e)})") from None
        if sums is not None:
            extra = sorted(set(names) - set(sums))
            if extra:
                raise _corrupt(path, f"tensor {extra[0]!r} has no checksum")
            lost = sorted(set(sums) - set(names))
            if lost:
                raise _corrupt(path, f"tensor {lost[0]!r} is missing")
        for name in names:
            try:
                t = f.get_tensor(name)
            except Exception as e:
                raise UserError(f"checkpoint {path}: cannot read tensors ({first_line(e)})") from None
            if sums is not None and tensor_checksum(t) != sums[name]:
                raise _corrupt(path, f"tensor {name!r} does not match its checksum")
            yield name, t


def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint's metadata and every tensor against their checksums, reading one tensor at a
    time. True when verified; False for a format written without checksums (1, 2); UserError when corrupt."""
    path = Path(path)
    md = read_metadata(path, verify=True)
    if not _checked(md):
        return False
    for _ in _read_tensors(path, md, verify=True):
        pass
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read a checkpoint; weights and optimizer tensors go to `map_location`, RNG states stay on CPU.

    With `verify` (the default) a format-3 file's metadata and each tensor are checked against their
    checksums as they are read (a mismatch is a one-line UserError naming the tensor); with
    `verify=False` nothing is hashed. Formats 1 and 2 carry no checksums and load unverified."""
    path = Path(path)
    md = read_metadata(path, verify=verify)
    _json(path, md, "spec")
    groups = _json(path, md, "optim_param_groups")
    scalars = _json(path, md, "optim_scalars")
    meta = _json(path, md, "meta")
    scaler = _json(path, md, "grad_scaler") if "grad_scaler" in md else None  # older checkpoints: none
    try:
        step, images = int(md["step"]), int(md["images"])
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path}: corrupt metadata ({first_line(e)})") from None
    net: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    refs: dict[str, torch.Tensor] = {}
    try:
        for name, t in _read_tensors(path, md, verify):  # one at a time: read, verify, move
            kind, _, rest = name.partition(".")
            if kind == "rng":  # RNG states are CPU byte tensors wherever the generator lives
                rng[rest] = t
            elif kind == "net":
                net[rest] = t.to(map_location)
            elif kind == "ema":
                ema[rest] = t.to(map_location)
            elif name.startswith("optim.state."):
                idx, _, key = rest.removeprefix("state.").partition(".")
                # step counters stay on the CPU: load_state_dict moves them only where torch wants them
                state.setdefault(int(idx), {})[key] = t if key == "step" else t.to(map_location)
            elif name.startswith("optim.ref."):
                refs[name] = t  # tensors nested in scalars or param_groups (e.g. a tensor lr) stay on CPU
            else:
                raise ValueError(f"unexpected tensor {name!r}")
        optim = None
        if groups is not None:
            for idx, entries in scalars.items():
                state.setdefault(int(idx), {}).update(_decode(entries, refs))
            optim = {"state": dict(sorted(state.items())), "param_groups": _decode(groups, refs)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {path}: corrupt contents ({first_line(e)})") from None
    renames = READABLE[md["format"]]
    return Checkpoint(
        spec_json=md["spec"],
        step=step,
        images=images,
        net=_rename(net, renames),
        ema=_rename(ema, renames) or None,
        optim=optim,
        rng=rng,
        scaler=scaler,
        meta=meta,
    )
