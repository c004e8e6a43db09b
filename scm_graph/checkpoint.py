"""Checkpoints: one safetensors file with JSON metadata (never pickle).

A checkpoint holds everything to resume training exactly (weights, EMA, optimizer state, RNG states,
counters) and the resolved spec, so it alone rebuilds the model. Layout: tensors under `net.`, `ema.`,
`optim.state.<param_index>.<key>`, `rng.<name>` (and `optim.ref.<n>` for the rare tensor nested
elsewhere in the optimizer state); metadata keys `format`, `spec`, `step`, `images`,
`optim_param_groups`, `optim_scalars`, `grad_scaler` (fp16 loss-scaler state; absent in older files)
and `meta` (JSON strings). Files of an older format version are read and brought to today's
parameter names (`READABLE`); files are always written in the newest.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from scm_graph.errors import UserError

FORMAT = "scm_graph.checkpoint/2"
_FORMAT_FAMILY = "scm_graph.checkpoint/"
# Version 1 (scm_graph 0.1) named the networks' conditioning layers differently; the parameter order,
# hence the optimizer state's indices, is unchanged. Prefixes of model parameter names, old -> new.
_V1_RENAMES = (
    ("net.map_label.", "net.emb.label."),
    ("net.map_guidance.", "net.emb.guidance."),
    ("net.map0.", "net.emb.fc0."),
    ("net.map1.", "net.emb.fc1."),
)
READABLE = {"scm_graph.checkpoint/1": _V1_RENAMES, FORMAT: ()}  # format -> the renames that bring it to today's names


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
    return _storable(tensors), metadata


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
        raise UserError(f"checkpoint {path} is not a safetensors file ({_first_line(e)})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """Header metadata of an scm_graph checkpoint, without loading tensors."""
    path = Path(path)
    md = _raw_metadata(path)
    if md.get("format") not in READABLE:
        found = f" (format {md['format']!r}, expected one of {', '.join(READABLE)})" if "format" in md else ""
        raise UserError(f"checkpoint {path} has no scm_graph metadata{found}")
    return md


def _json(path: Path, md: dict[str, str], key: str) -> Any:
    try:
        return json.loads(md[key])
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path}: corrupt metadata {key!r} ({_first_line(e)})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint; weights and optimizer tensors go to `map_location`, RNG states stay on CPU."""
    path = Path(path)
    md = read_metadata(path)
    _json(path, md, "spec")
    groups = _json(path, md, "optim_param_groups")
    scalars = _json(path, md, "optim_scalars")
    meta = _json(path, md, "meta")
    scaler = _json(path, md, "grad_scaler") if "grad_scaler" in md else None  # older checkpoints: none
    try:
        step, images = int(md["step"]), int(md["images"])
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path}: corrupt metadata ({_first_line(e)})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"checkpoint {path}: cannot read tensors ({_first_line(e)})") from None
    net: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    refs: dict[str, torch.Tensor] = {}
    try:
        for name, t in tensors.items():
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
        raise UserError(f"checkpoint {path}: corrupt contents ({_first_line(e)})") from None
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
