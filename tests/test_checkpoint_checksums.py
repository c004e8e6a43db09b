"""Checkpoint checksums: written for every tensor and for the metadata, checked on load, and a real flipped
byte in a real file is caught and named. The expected checksums are computed here with hashlib from the
file's own bytes (parsed from the safetensors header by hand), not with the module's helpers."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import scm_graph.checkpoint as ckmod
from scm_graph.checkpoint import FORMAT, Checkpoint, load_checkpoint, read_metadata, save_checkpoint, verify_checkpoint
from scm_graph.spec import Spec, spec_to_json
from tests.helpers import one_line_error

HINT = "; pass --ignore-checksum to load it anyway"
# safetensors dtype names -> torch's, for the hand-computed checksums
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def _ckpt() -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    net = {
        "enc.0.weight": torch.randn(8, 4, generator=g),
        "enc.0.bias": torch.randn(8, generator=g),
        "bf": torch.randn(5, 3, generator=g).bfloat16(),
        "half": torch.randn(7, generator=g).half(),
        "idx": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "bytes": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    model = torch.nn.Linear(4, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4, generator=g)).square().mean().backward()
    opt.step()
    return Checkpoint(
        spec_json=spec_to_json(Spec()),
        step=3,
        images=48,
        net=net,
        ema={k: ~v if v.dtype == torch.bool else v + 1 for k, v in net.items()},
        optim=opt.state_dict(),
        rng={"torch": torch.get_rng_state()},
        meta={"objective": "sct", "loss": 0.25},
    )


def _header(path: Path) -> tuple[dict, int, bytes]:
    """(safetensors header JSON, offset of the data region, the file's bytes), parsed by hand."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n, data


def _sha(prefix_and_data: bytes) -> str:
    return hashlib.sha256(prefix_and_data).hexdigest()[:32]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a loaded tensor through numpy (bf16 through an int16 view: numpy has no bf16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes()


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "x" / "ckpt.safetensors"
    save_checkpoint(path, _ckpt())
    return path


def test_checksums_are_written_for_every_tensor_and_the_metadata(saved: Path) -> None:
    header, start, data = _header(saved)
    md = header.pop("__metadata__")
    assert md["format"] == FORMAT == "scm_graph.checkpoint/3"
    sums = json.loads(md["tensor_sha256"])
    assert set(sums) == set(header) and len(sums) > 20
    assert all(re.fullmatch("[0-9a-f]{32}", v) for v in sums.values())
    loaded = safetensors.torch.load_file(str(saved))
    dtypes = set()
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        dtypes.add(dtype)
        prefix = json.dumps([dtype, info["shape"]]).encode() + b"\n"
        assert sums[name] == _sha(prefix + data[start + begin : start + end]), name  # from the file's bytes
        t = loaded[name]
        assert sums[name] == _sha(prefix + _tensor_bytes(t)), name  # from the loaded tensor
    assert {"float32", "bfloat16", "float16", "int64", "uint8", "bool"} <= dtypes
    # equal dtype, shape and bytes give equal checksums (the two empty tensors, the Adam step counters), any
    # other difference differs
    assert sums["net.empty"] == sums["ema.empty"] and sums["optim.state.0.step"] == sums["optim.state.1.step"]
    assert all(sums[f"net.{k}"] != sums[f"ema.{k}"] for k in _ckpt().net if k != "empty")
    rest = {k: v for k, v in md.items() if k != "metadata_sha256"}
    assert md["metadata_sha256"] == _sha(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    assert verify_checkpoint(saved) is True


def _flip_tensor_byte(path: Path, name: str) -> None:
    header, start, data = _header(path)
    begin, end = header[name]["data_offsets"]
    assert end > begin, name
    pos = start + (begin + end) // 2
    buf = bytearray(data)
    buf[pos] ^= 0x01
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("name", ["ema.enc.0.weight", "net.bf", "net.idx", "net.half", "rng.torch", "optim.state.0.exp_avg"])
def test_flipped_tensor_byte_is_caught_and_named(saved: Path, name: str) -> None:
    clean = copy.deepcopy(load_checkpoint(saved))  # a copy: safetensors maps the file, which is changed in place
    _flip_tensor_byte(saved, name)
    before = saved.read_bytes()
    msg = one_line_error(load_checkpoint, saved)
    assert msg == f"checkpoint {saved} is corrupt: tensor {name!r} does not match its checksum{HINT}"
    assert one_line_error(verify_checkpoint, saved) == msg
    assert saved.read_bytes() == before  # a failed load leaves the file alone
    read_metadata(saved)  # the metadata is intact: reading it alone still works

    # verify=False loads it anyway, with exactly that tensor changed (so the flip really was in its data)
    got = load_checkpoint(saved, verify=False)
    flat_clean = {**{f"net.{k}": v for k, v in clean.net.items()}, **{f"ema.{k}": v for k, v in clean.ema.items()},
                  **{f"rng.{k}": v for k, v in clean.rng.items()},
                  **{f"optim.state.{i}.{k}": v for i, st in clean.optim["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}}
    flat_got = {**{f"net.{k}": v for k, v in got.net.items()}, **{f"ema.{k}": v for k, v in got.ema.items()},
                **{f"rng.{k}": v for k, v in got.rng.items()},
                **{f"optim.state.{i}.{k}": v for i, st in got.optim["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}}
    assert flat_got.keys() == flat_clean.keys()
    changed = [k for k in flat_clean if _tensor_bytes(flat_clean[k]) != _tensor_bytes(flat_got[k])]
    assert changed == [name]


def _flip_metadata_digit(path: Path, key: str) -> tuple[str, str]:
    """Change one digit inside metadata value `key` in the file's header (the header stays valid JSON and
    the same length); returns (old value, new value) as the header now reads."""
    header, start, data = _header(path)
    old = header["__metadata__"][key]
    head = data[8:start]
    at = head.index(f'"{key}":"'.encode()) + len(key) + 4
    pos = next(i for i in range(at, len(head)) if head[i : i + 1].isdigit() and (key != "spec" or head[i - 2 : i] == b": "))
    buf = bytearray(data)
    buf[8 + pos] = ord(str((int(chr(head[pos])) + 1) % 10))
    path.write_bytes(bytes(buf))
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md[key] != old and {k: v for k, v in md.items() if k != key} == {k: v for k, v in header["__metadata__"].items() if k != key}
    return old, md[key]


@pytest.mark.parametrize("key", ["spec", "step", "optim_param_groups", "format"])
def test_flipped_metadata_digit_is_caught(saved: Path, key: str) -> None:
    old, new = _flip_metadata_digit(saved, key)
    if key == "spec":
        json.loads(new)  # still valid JSON, just a different spec
    if key == "format":
        assert new == "scm_graph.checkpoint/4"
        msg = one_line_error(load_checkpoint, saved, "cpu", False)  # unreadable with or without verification
        assert msg.startswith(f"checkpoint {saved} has no scm_graph metadata (format 'scm_graph.checkpoint/4'")
        return
    want = f"checkpoint {saved} is corrupt: its metadata does not match its checksum{HINT}"
    assert one_line_error(load_checkpoint, saved) == want
    assert one_line_error(read_metadata, saved) == want
    assert one_line_error(verify_checkpoint, saved) == want
    got = load_checkpoint(saved, verify=False)
    if key == "spec":
        assert got.spec_json == new != old
    if key == "step":
        assert got.step == int(new) != int(old)


def test_format_flipped_to_2_is_still_verified(saved: Path) -> None:
    """A format-3 file whose format digit reads 2 still carries checksums: they are checked, not skipped."""
    _, start, data = _header(saved)
    head = data[8:start]
    pos = head.index(b"scm_graph.checkpoint/3") + len("scm_graph.checkpoint/")
    buf = bytearray(data)
    buf[8 + pos] = ord("2")
    saved.write_bytes(bytes(buf))
    assert one_line_error(load_checkpoint, saved) == f"checkpoint {saved} is corrupt: its metadata does not match its checksum{HINT}"


def test_verify_false_hashes_nothing(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _flip_tensor_byte(saved, "net.enc.0.weight")
    _flip_metadata_digit(saved, "images")

    def no_hashing(*a, **kw):
        raise AssertionError("hashed with verify=False")

    monkeypatch.setattr(ckmod.hashlib, "sha256", no_hashing)
    got = load_checkpoint(saved, verify=False)
    assert got.images == 58 and got.step == 3  # "48" with its first digit flipped
    with pytest.raises(AssertionError, match="hashed"):
        load_checkpoint(saved)


def test_read_metadata_hashes_no_tensor(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _flip_tensor_byte(saved, "net.enc.0.weight")

    def no_tensor_hashing(t):
        raise AssertionError("read_metadata hashed a tensor")

    monkeypatch.setattr(ckmod, "tensor_checksum", no_tensor_hashing)
    assert read_metadata(saved)["step"] == "3"


def _format2(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    md = {"format": "scm_graph.checkpoint/2", "spec": spec_to_json(Spec()), "step": "5", "images": "80",
          "optim_param_groups": "null", "optim_scalars": "{}", "grad_scaler": "null", "meta": '{"objective": "sct"}'}
    safetensors.torch.save_file(tensors, str(path), metadata=md)


def test_format_2_without_checksums_loads_unverified(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    _format2(path, {"net.w": w, "ema.w": w * 2, "rng.torch": torch.get_rng_state()})
    assert "tensor_sha256" not in read_metadata(path)
    ck = load_checkpoint(path)
    assert (ck.step, ck.images, ck.meta) == (5, 80, {"objective": "sct"})
    assert torch.equal(ck.net["w"], w) and torch.equal(ck.ema["w"], w * 2)
    assert verify_checkpoint(path) is False  # nothing to verify against
    _flip_tensor_byte(path, "net.w")
    flipped = load_checkpoint(path)  # unverified: a damaged old file is not detectable
    assert not torch.equal(flipped.net["w"], w)
    save_checkpoint(path, ck)  # re-saving an old checkpoint upgrades it to format 3 with checksums
    assert read_metadata(path)["format"] == FORMAT and verify_checkpoint(path) is True


def test_missing_or_extra_tensor_is_caught(saved: Path, tmp_path: Path) -> None:
    md = read_metadata(saved)
    tensors = safetensors.torch.load_file(str(saved))
    fewer = tmp_path / "fewer.safetensors"
    safetensors.torch.save_file({k: v for k, v in tensors.items() if k != "net.bf"}, str(fewer), metadata=md)
    assert one_line_error(load_checkpoint, fewer) == f"checkpoint {fewer} is corrupt: tensor 'net.bf' is missing{HINT}"
    more = tmp_path / "more.safetensors"
    safetensors.torch.save_file({**tensors, "net.intruder": torch.ones(2)}, str(more), metadata=md)
    assert one_line_error(load_checkpoint, more) == f"checkpoint {more} is corrupt: tensor 'net.intruder' has no checksum{HINT}"
    assert load_checkpoint(more, verify=False).net["intruder"].tolist() == [1.0, 1.0]


def test_checksums_of_gpu_and_noncontiguous_tensors_match_their_saved_bytes(tmp_path: Path) -> None:
    w = torch.randn(6, 4)
    net = {"t": w.t(), "view": w[1:3], "tied": w, "w": w}
    if torch.cuda.is_available():
        net["gpu"] = w.cuda().bfloat16()
    save_checkpoint(tmp_path / "ck", Checkpoint(spec_to_json(Spec()), 0, 0, net))
    assert verify_checkpoint(tmp_path / "ck") is True
    got = load_checkpoint(tmp_path / "ck")
    assert torch.equal(got.net["t"], w.t()) and torch.equal(got.net["view"], w[1:3])
