"""Checkpoint round trips, exact resume, and refusal of files that are not our checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import scm_graph.checkpoint as ckmod
from scm_graph.checkpoint import FORMAT, Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from scm_graph.errors import UserError
from scm_graph.spec import Spec, spec_from_json, spec_to_json

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.8, 0.95), decoupled_weight_decay=True),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    opt.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


def _trained(kind: str, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters())
    for i in range(steps):
        _step(model, opt, i)
    return model, opt


def _ckpt(model: nn.Module, opt: torch.optim.Optimizer | None, gen: torch.Generator | None = None) -> Checkpoint:
    net = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Checkpoint(
        spec_json=spec_to_json(Spec()),
        step=3,
        images=48,
        net=net,
        ema={k: (v * 0.5).to(torch.float64) for k, v in net.items()},
        optim=opt.state_dict() if opt is not None else None,
        rng={"torch": torch.get_rng_state(), **({"gen": gen.get_state()} if gen is not None else {})},
        meta={"objective": "sct", "wall_s": 1.5, "metrics": {"loss": 0.25, "nan": None}},
    )


def _assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_round_trip_and_exact_resume(tmp_path: Path, kind: str) -> None:
    model, opt = _trained(kind)
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)  # advance it past its seed state
    ck = _ckpt(model, opt, gen)
    path = tmp_path / "sub" / "dir" / "ck.safetensors"  # parents are created
    save_checkpoint(path, ck)
    got = load_checkpoint(path)

    assert got.spec_json == ck.spec_json and spec_from_json(got.spec_json) == Spec()
    assert (got.step, got.images) == (3, 48)
    assert got.meta == ck.meta
    _assert_tensors_equal(got.net, ck.net)
    assert got.ema is not None
    _assert_tensors_equal(got.ema, ck.ema)
    _assert_tensors_equal(got.rng, ck.rng)

    # optimizer state: same structure, tuple betas survive JSON
    assert got.optim is not None
    ref = opt.state_dict()
    assert got.optim["param_groups"] == ref["param_groups"]
    assert all(isinstance(g["betas"], tuple) for g in got.optim["param_groups"])
    assert set(got.optim["state"]) == set(ref["state"])
    for idx, st in ref["state"].items():
        assert set(got.optim["state"][idx]) == set(st)
        for key, v in st.items():
            w = got.optim["state"][idx][key]
            assert torch.equal(w, v) and w.dtype == v.dtype if isinstance(v, torch.Tensor) else w == v

    # resume: fresh model + fresh optimizer from the checkpoint; next step is bit-identical
    model2 = _model(seed=123)
    model2.load_state_dict(got.net)
    opt2 = OPTIMIZERS[kind](model2.parameters())
    opt2.load_state_dict(got.optim)
    for i in range(3, 6):
        _step(model, opt, i)
        _step(model2, opt2, i)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)


def test_grad_scaler_state_round_trip(tmp_path: Path) -> None:
    """The fp16 loss scaler's state is plain JSON metadata; files without it load with scaler None."""
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(i))
        scaler.scale(model(x).square().mean() * (1e38 if i == 1 else 1.0)).backward()  # step 1 overflows
        scaler.step(opt)
        scaler.update()
    ck = _ckpt(model, opt)
    ck.scaler = scaler.state_dict()
    save_checkpoint(tmp_path / "ck", ck)
    got = load_checkpoint(tmp_path / "ck")
    assert got.scaler == scaler.state_dict() and got.scaler["scale"] == 2.0**9
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(got.scaler)
    assert fresh.state_dict() == scaler.state_dict()
    save_checkpoint(tmp_path / "plain", _ckpt(model, opt))
    assert load_checkpoint(tmp_path / "plain").scaler is None
    md = read_metadata(tmp_path / "plain")  # a file written before the key existed: format 2, no checksums
    for key in ("grad_scaler", "tensor_sha256", "metadata_sha256"):
        del md[key]
    md["format"] = "scm_graph.checkpoint/2"
    safetensors.torch.save_file(safetensors.torch.load_file(str(tmp_path / "plain")), str(tmp_path / "old"), metadata=md)
    old = load_checkpoint(tmp_path / "old")
    assert old.scaler is None and old.optim is not None


def test_rng_states_reproduce_draws(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    torch.randn(5, generator=gen)
    torch.manual_seed(11)
    torch.rand(4)
    save_checkpoint(tmp_path / "ck", Checkpoint(spec_to_json(Spec()), 0, 0, {}, None, None,
                                                {"torch": torch.get_rng_state(), "gen": gen.get_state()}, {}))
    expect_cpu, expect_gen = torch.randn(6), torch.randn(6, generator=gen)
    got = load_checkpoint(tmp_path / "ck")
    assert got.ema is None and got.optim is None and got.net == {}
    torch.set_rng_state(got.rng["torch"])
    gen2 = torch.Generator()
    gen2.set_state(got.rng["gen"])
    assert torch.equal(torch.randn(6), expect_cpu)
    assert torch.equal(torch.randn(6, generator=gen2), expect_gen)


def test_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    w = torch.randn(6, 4)
    net = {"a": w, "tied": w, "view": w[1:3], "t": w.t(), "scalar": torch.tensor(2.0), "empty": torch.zeros(0)}
    save_checkpoint(tmp_path / "ck", Checkpoint(spec_to_json(Spec()), 1, 2, net, None, None, {}, {}))
    got = load_checkpoint(tmp_path / "ck")
    _assert_tensors_equal(got.net, {k: v.contiguous() for k, v in net.items()})


def test_read_metadata_loads_no_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _trained("adam")
    save_checkpoint(tmp_path / "ck", _ckpt(model, opt))
    real = ckmod.safe_open

    class NoTensors:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.inner.metadata()

        def get_tensor(self, name):
            raise AssertionError("read_metadata loaded a tensor")

    monkeypatch.setattr(ckmod, "safe_open", NoTensors)
    md = read_metadata(tmp_path / "ck")
    assert md["format"] == FORMAT
    assert spec_from_json(md["spec"]) == Spec()
    assert (md["step"], md["images"]) == ("3", "48")
    assert json.loads(md["meta"])["objective"] == "sct"
    assert json.loads(md["optim_param_groups"])[0]["lr"] == 1e-2
    assert set(json.loads(md["optim_scalars"])) == {"0", "1", "2", "3"}


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["garbage"] = tmp_path / "garbage.safetensors"
    files["garbage"].write_bytes(os.urandom(4096))
    files["pickle"] = tmp_path / "model.pt"
    torch.save({"w": torch.randn(3)}, files["pickle"])
    files["plain"] = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3)}, str(files["plain"]))
    files["foreign"] = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3)}, str(files["foreign"]), metadata={"format": "pt"})
    files["bad_json"] = tmp_path / "bad_json.safetensors"
    md = {"format": "scm_graph.checkpoint/2", "spec": "{}", "step": "1", "images": "1", "optim_param_groups": "null",
          "optim_scalars": "{}", "meta": "{not json"}  # format 2: no checksums, so the bad JSON itself is met
    safetensors.torch.save_file({"net.w": torch.randn(3)}, str(files["bad_json"]), metadata=md)
    files["no_checksums"] = tmp_path / "no_checksums.safetensors"  # format 3 always carries checksums
    safetensors.torch.save_file({"net.w": torch.randn(3)}, str(files["no_checksums"]), metadata={**md, "format": FORMAT, "meta": "{}"})
    files["truncated"] = tmp_path / "truncated.safetensors"
    save_checkpoint(files["truncated"], _ckpt(*_trained("adam")))
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) - 100])
    files["empty"] = tmp_path / "empty"
    files["empty"].write_bytes(b"")
    return files


def test_load_errors_are_user_errors_and_leave_files_alone(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")
    for name, path in _bad_files(tmp_path).items():
        before = path.read_bytes()
        with pytest.raises(UserError) as ei:
            load_checkpoint(path)
        msg = str(ei.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)
        if name in ("plain", "foreign"):
            assert "has no scm_graph metadata" in msg
        if name == "bad_json":
            assert "corrupt metadata 'meta'" in msg
        if name == "no_checksums":
            assert msg == f"checkpoint {path} is corrupt: it carries no checksums (every {FORMAT} file does); pass --ignore-checksum to load it anyway"
        assert path.read_bytes() == before, name


def test_save_refuses_to_clobber_other_files(tmp_path: Path) -> None:
    ck = _ckpt(*_trained("adam"))
    for name, path in _bad_files(tmp_path).items():
        if name in ("truncated", "bad_json", "no_checksums"):
            continue  # those are (damaged) scm_graph checkpoints: replacing them is fine
        before = path.read_bytes()
        with pytest.raises(UserError, match="refusing to overwrite"):
            save_checkpoint(path, ck)
        assert path.read_bytes() == before, name
    text = tmp_path / "notes.txt"
    text.write_text("precious")
    with pytest.raises(UserError, match="not an scm_graph checkpoint"):
        save_checkpoint(text, ck)
    assert text.read_text() == "precious"
    with pytest.raises(UserError):
        save_checkpoint(tmp_path, ck)  # a folder
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_save_replaces_existing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.safetensors"
    ck = _ckpt(*_trained("adam"))
    save_checkpoint(path, ck)
    ck.step, ck.images = 9, 144
    save_checkpoint(path, ck)
    got = load_checkpoint(path)
    assert (got.step, got.images) == (9, 144)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.safetensors"
    ck = _ckpt(*_trained("radam"))
    save_checkpoint(path, ck)
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    ck.step = 99
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, ck)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]
    monkeypatch.undo()
    assert load_checkpoint(path).step == 3


def test_unjsonable_meta_fails_before_writing(tmp_path: Path) -> None:
    ck = _ckpt(*_trained("adam"))
    ck.meta = {"bad": object()}
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ck", ck)
    assert list(tmp_path.iterdir()) == []


def test_optimizer_scalars_nested_tensors_and_tensor_lr(tmp_path: Path) -> None:
    buf, nested = torch.randn(3), torch.arange(4)
    optim = {
        "state": {0: {"step": 3.0, "buf": buf, "hist": (1, 2.5), "nested": [nested, None]}, 2: {"k": 1}},
        "param_groups": [{"lr": torch.tensor(0.01), "betas": (0.9, 0.99), "params": [0, 1, 2], "foreach": None}],
    }
    save_checkpoint(tmp_path / "ck", Checkpoint(spec_to_json(Spec()), 1, 1, {}, None, optim, {}, {}))
    got = load_checkpoint(tmp_path / "ck").optim
    assert got is not None and list(got["state"]) == [0, 2]
    s0 = got["state"][0]
    assert s0["step"] == 3.0 and s0["hist"] == (1, 2.5) and torch.equal(s0["buf"], buf)
    assert torch.equal(s0["nested"][0], nested) and s0["nested"][1] is None
    assert got["state"][2] == {"k": 1}
    (g,) = got["param_groups"]
    assert torch.equal(g["lr"], torch.tensor(0.01)) and g["betas"] == (0.9, 0.99)
    assert g["params"] == [0, 1, 2] and g["foreach"] is None

    # a real optimizer with a tensor learning rate resumes exactly too
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2), foreach=False)
    for i in range(2):
        _step(model, opt, i)
    save_checkpoint(tmp_path / "ck", _ckpt(model, opt))
    got2 = load_checkpoint(tmp_path / "ck")
    model2 = _model(seed=5)
    model2.load_state_dict(got2.net)
    opt2 = torch.optim.Adam(model2.parameters(), lr=torch.tensor(1e-2), foreach=False)
    opt2.load_state_dict(got2.optim)
    _step(model, opt, 2)
    _step(model2, opt2, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_saved_checkpoint_respects_umask(tmp_path):
    import os
    import stat

    from scm_graph.spec import Spec, spec_to_json

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.safetensors", Checkpoint(spec_to_json(Spec()), 0, 0, {"w": torch.zeros(2)}))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.safetensors").st_mode) == 0o644
