"""The spec dataclasses: spec files' content, the JSON round trip (and the 0.1 layout), value checks (each
bad value through the CLI path, exact messages), and every field declaring its valid values."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest

import scm_graph.spec as specmod
from scm_graph.checks import Check
from scm_graph.errors import UserError
from scm_graph.spec import (
    DiTSpec,
    NetSpec,
    ObjectiveSpec,
    Spec,
    TrainSpec,
    UNetSpec,
    spec_from_json,
    spec_to_json,
    validate,
)
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, assert_user_error, one_line_error, run_cli

SPEC_FILES = sorted(p for p in SPECS.glob("*.py") if not p.name.startswith("_"))  # _imagenet.py is their table, not a spec


@pytest.fixture(scope="module")
def sct() -> Spec:
    return read_spec_file(SPECS / "digits_sct.py")


def test_digits_specs_content():
    sct = read_spec_file(SPECS / "digits_sct.py")
    dif = read_spec_file(SPECS / "digits_diffusion.py")
    assert sct.objective.kind == "sct" and dif.objective.kind == "diffusion"
    assert sct.data.name == dif.data.name == "digits"
    assert dif.net == sct.net  # the diffusion run can initialise the sCT run (train.init_from)
    assert sct.net.dropout > 0


# ----------------------------------------------------------------------------- JSON round trip


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_json_round_trip(path: Path):
    spec = read_spec_file(path)
    back = spec_from_json(spec_to_json(spec))
    assert back == spec
    assert spec_to_json(back) == spec_to_json(spec)
    # with CLI tuples and a resolved data section too
    spec2 = apply_overrides(spec, ["--net.unet.channel_mult", "1", "2", "3", "--optim.betas", "0.5", "0.6"])
    spec2 = dataclasses.replace(spec2, data=dataclasses.replace(spec2.data, resolution=8, channels=1, mean=(70.0,), std=(90.0,)))
    back2 = spec_from_json(spec_to_json(spec2))
    assert back2 == spec2 and isinstance(back2.data.mean, tuple) and isinstance(back2.optim.betas, tuple)


def test_json_round_trip_defaults():
    assert spec_from_json(spec_to_json(Spec())) == Spec()


def test_json_of_version_0_1_flat_net_section_maps_to_the_nested_one():
    """Checkpoints written before the per-architecture sections existed (flat `net`) still load."""
    old = {"name": "old", "net": {"arch": "dit", "channels": 48, "channel_mult": [1, 2], "num_blocks": 3,
                                  "attn_resolutions": [4], "dropout": 0.25, "emb_mult": 2, "class_conditional": True,
                                  "norm_groups": 8, "head_dim": 16, "patch_size": 4, "depth": 5, "mlp_ratio": 3.0}}
    spec = spec_from_json(json.dumps(old))
    assert spec.net == NetSpec(
        arch="dit", dropout=0.25, class_conditional=True,
        unet=UNetSpec(channels=48, channel_mult=(1, 2), num_blocks=3, attn_resolutions=(4,), head_dim=16, norm_groups=8, emb_mult=2),
        dit=DiTSpec(width=48, depth=5, patch_size=4, head_dim=16, mlp_ratio=3.0, emb_mult=2))
    # the oldest files predate the DiT and attention fields: those keep today's defaults
    oldest = {"net": {"channels": 32, "channel_mult": [1, 2], "num_blocks": 2, "dropout": 0.1, "emb_mult": 4,
                      "class_conditional": False, "norm_groups": 8}}
    spec = spec_from_json(json.dumps(oldest))
    assert spec.net.arch == "unet" and spec.net.unet == UNetSpec(channels=32, channel_mult=(1, 2), num_blocks=2, norm_groups=8)
    assert spec_from_json(spec_to_json(spec)) == spec


@pytest.mark.parametrize("args,needle", [
    (["--train.batch", "0"], "batch"),
    (["--train.total_images", "-1"], "total_images"),
    (["--net.dropout", "1.0"], "dropout"),
    (["--objective.sigma_d", "0"], "sigma_d"),
    (["--objective.sigma_d", "nan"], "sigma_d"),
])
def test_validate_rejects(sct: Spec, args, needle):
    """Single-value checks; network shapes are checked by scm_graph.model.check_net (tests/test_model.py)."""
    assert needle in one_line_error(validate, apply_overrides(sct, args))


# ----------------------------------------------------------------------------- each bad value, through the CLI path


@pytest.mark.parametrize("args,want", [
    (["--optim.lr", "nan"], "optim.lr must be a finite number, not nan"),
    (["--optim.lr", "inf"], "optim.lr must be a finite number, not inf"),
    (["--optim.lr", "-1"], "optim.lr must be >= 0, not -1.0"),
    (["--optim.betas", "1.5", "0.99"], "optim.betas must each be in [0, 1), not (1.5, 0.99)"),
    (["--optim.betas", "0.9", "1"], "optim.betas must each be in [0, 1), not (0.9, 1.0)"),
    (["--optim.betas", "-0.1", "0.9"], "optim.betas must each be in [0, 1), not (-0.1, 0.9)"),
    (["--optim.eps", "-1"], "optim.eps must be > 0, not -1.0"),
    (["--optim.eps", "0"], "optim.eps must be > 0, not 0.0"),
    (["--train.ema_halflife_images", "-1"], "train.ema_halflife_images must be >= 0, not -1.0"),
    (["--objective.P_std", "0"], "objective.P_std must be > 0, not 0.0"),
    (["--objective.P_mean", "nan"], "objective.P_mean must be a finite number, not nan"),
    (["--optim.grad_clip", "-1"], "optim.grad_clip must be >= 0, not -1.0"),
    (["--train.eval_samples", "1"], "train.eval_samples must be >= 2, not 1"),
    (["--train.seed", "-1"], "train.seed must be in [0, 2147483648), not -1"),
    (["--train.seed", "2147483648"], "train.seed must be in [0, 2147483648), not 2147483648"),
    (["--train.device", "gpu"], "train.device must be auto, cpu, mps, cuda or cuda:N, not 'gpu'"),
    (["--train.device", "cuda:"], "train.device must be auto, cpu, mps, cuda or cuda:N, not 'cuda:'"),
    (["--name", "a/b"], "name must be a plain folder name (no slash or control character, not starting with a dot), not 'a/b'"),
    (["--name", ".hidden"], "name must be a plain folder name (no slash or control character, not starting with a dot), not '.hidden'"),
    (["--name", ""], "name must be a plain folder name (no slash or control character, not starting with a dot), not ''"),
    (["--data.name", "../digits"], "data.name must be a plain folder name (no slash or control character, not starting with a dot), not '../digits'"),
    (["--net.unet.channel_mult"], "net.unet.channel_mult must not be empty, not ()"),
    (["--net.unet.channel_mult", "1", "0"], "net.unet.channel_mult must each be >= 1, not (1, 0)"),
    (["--train.keep_last", "0"], "train.keep_last must be >= 1, not 0"),
    (["--train.progress_every_s", "0"], "train.progress_every_s must be > 0, not 0.0"),
    (["--data.std", "0"], "data.std must each be > 0, not (0.0,)"),
    (["--optim.lr", "-1", "--optim.eps", "0"], "optim.lr must be >= 0, not -1.0 (and 1 more)"),
    (["--train.accum", "0"], "train.accum must be >= 1, not 0"),
    (["--train.batch", "12", "--train.accum", "5"], "train.batch 12 does not divide into train.accum 5 micro-batches"),
    (["--train.dist_timeout_s", "0"], "train.dist_timeout_s must be > 0, not 0.0"),
    (["--net.time_scale", "0"], "net.time_scale must be > 0, not 0.0"),
    (["--net.time_scale", "-1000"], "net.time_scale must be > 0, not -1000.0"),
    (["--net.time_scale", "inf"], "net.time_scale must be a finite number, not inf"),
    (["--train.eval_t_mid", "0"], "train.eval_t_mid must be > 0, not 0.0"),
    (["--train.eval_t_mid", "-1.1"], "train.eval_t_mid must be > 0, not -1.1"),
    (["--train.eval_t_mid", "1.6"], "train.eval_t_mid must be below t_max = arctan(80 / objective.sigma_d) = 1.5645, not 1.6"),
    (["--train.eval_t_mid", "1.5645464081731977"],
     "train.eval_t_mid must be below t_max = arctan(80 / objective.sigma_d) = 1.5645, not 1.5645464081731977"),
    (["--objective.sigma_d", "80", "--train.eval_t_mid", "1.1"],
     "train.eval_t_mid must be below t_max = arctan(80 / objective.sigma_d) = 0.7854, not 1.1"),
])
def test_each_bad_value_is_one_exact_line(sct: Spec, args: list[str], want: str):
    assert one_line_error(validate, apply_overrides(sct, args)) == want


@pytest.mark.parametrize("args", [
    ["--optim.lr", "0"], ["--optim.betas", "0", "0.999"], ["--optim.eps", "1e-30"], ["--optim.grad_clip", "0"],
    ["--train.ema_halflife_images", "0"], ["--objective.P_mean", "-5"], ["--train.eval_samples", "2"],
    ["--train.seed", "2147483647"], ["--train.device", "cuda:1"], ["--train.device", "mps"], ["--name", "a.b"],
    ["--net.unet.attn_resolutions"], ["--data.mean"], ["--data.std"], ["--train.keep_last", "1"],
    ["--train.progress_every_s", "0.001"], ["--net.dropout", "0"], ["--data.channels", "3"],
    ["--net.time_scale", "1000"], ["--net.time_scale", "1e-3"], ["--train.eval_t_mid", "1e-6"],
    ["--train.eval_t_mid", "1.5645464081731975"], ["--objective.sigma_d", "80", "--train.eval_t_mid", "0.78"],
])
def test_edge_values_that_are_valid(sct: Spec, args: list[str]):
    validate(apply_overrides(sct, args))


def test_bool_word_in_the_equals_form(sct: Spec):
    assert apply_overrides(sct, ["--train.compile=false"]).train.compile is False
    assert apply_overrides(sct, ["--train.compile=No"]).train.compile is False
    assert apply_overrides(sct, ["--train.compile=on"]).train.compile is True


def test_a_channel_count_outside_the_choices(sct: Spec):
    """A Literal field: tyro refuses it while parsing, naming the flag and the choices."""
    msg = one_line_error(apply_overrides, sct, ["--data.channels", "2"])
    assert "--data.channels" in msg and "'2'" in msg and "'0', '1', '3'" in msg, msg


def _write_spec(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.py"
    p.write_text("from scm_graph.spec import DataSpec, OptimSpec, Spec, TrainSpec\n"
                 f"SPEC = Spec(name={name!r}, {body})\n")
    return p


@pytest.mark.parametrize("body,want", [
    ('optim=OptimSpec(lr="1e-3")', "optim.lr must be a number, not '1e-3'"),
    ("train=TrainSpec(batch=12.0)", "train.batch must be an integer, not 12.0"),
    ("optim=OptimSpec(betas=[0.9, 0.99])", "optim.betas must be a tuple, not [0.9, 0.99]"),
    ("train=TrainSpec(compile=1)", "train.compile must be true or false, not 1"),
    ("optim=OptimSpec(lr=10**400)", "optim.lr must be a finite number, not " + str(10**400)[:77] + "..."),
])
@pytest.mark.filterwarnings("ignore:The field .* but the default value:UserWarning")  # tyro notices it too
def test_wrong_types_from_a_spec_file(tmp_path: Path, body: str, want: str):
    """A spec file is Python: any value can arrive; the type is checked after the overrides are applied."""
    spec = apply_overrides(read_spec_file(_write_spec(tmp_path, "wrong", body)), [])
    assert one_line_error(validate, spec) == want


@pytest.mark.parametrize("body,want", [
    ("data=DataSpec(mean=0.5)", "data.mean must be a tuple, not 0.5"),
    ("data=DataSpec(std=1)", "data.std must be a tuple, not 1"),
    ("data=3", "data must be a DataSpec, not 3"),
    ("data=DataSpec(mean=(float('nan'),))", "data.mean must hold finite numbers, not (nan,)"),
])
def test_wrong_data_types_from_a_spec_file(tmp_path: Path, body: str, want: str):
    spec = read_spec_file(_write_spec(tmp_path, "wrong_data", body))
    assert one_line_error(validate, spec) == want


@pytest.mark.parametrize("args,needles", [
    (["--optim.lr", "nan"], ["error: optim.lr must be a finite number, not nan"]),
    (["--optim.betas", "1.5", "0.99"], ["error: optim.betas must each be in [0, 1), not (1.5, 0.99)"]),
    (["--data.channels", "2"], ["--data.channels", "'0', '1', '3'"]),
    (["--train.device", "gpu", "--train.seed", "-1"],
     ["error: train.seed must be in [0, 2147483648), not -1 (and 1 more)"]),
    (["--net.time_scale", "0"], ["error: net.time_scale must be > 0, not 0.0"]),
    (["--train.eval_t_mid", "2"], ["error: train.eval_t_mid must be below t_max = arctan(80 / objective.sigma_d) = 1.5645, not 2.0"]),
])
def test_train_cli_bad_values(args: list[str], needles: list[str]):
    """`python -m scm_graph.train`: exit 2 and one line, before any shard is opened."""
    line = assert_user_error(run_cli("scm_graph.train", "specs/digits_sct.py", *args, timeout=120), *needles)
    if needles[0].startswith("error: "):
        assert line == needles[0]


def test_train_cli_wrong_type_from_a_spec_file(tmp_path: Path):
    p = _write_spec(tmp_path, "wrong_lr", 'optim=OptimSpec(lr="1e-3")')
    line = assert_user_error(run_cli("scm_graph.train", p, timeout=120))
    assert line == "error: optim.lr must be a number, not '1e-3'"


# ----------------------------------------------------------------------------- every field has its valid values

# Fields with no Check, Literal or bool: any value of their type is valid (a float is still checked to be finite).
FREE_FIELDS = {
    "objective.P_mean": "mean of log(sigma) of the time proposal: any finite number",
    "data.mean": "per-channel means in stored units: any finite numbers (their count is checked by validate)",
    "train.init_from": "a checkpoint path, empty = none (checked when the checkpoint is read)",
    "train.out": "a run folder, empty = runs/<name> (checked when the run folder is made)",
    "data.vae": "a diffusers VAE folder, empty = the manifest's (checked when the VAE is loaded)",
    "objective.teacher": "a checkpoint or weights path (validate requires one for sCD; checked when it is read)",
    "objective.teacher_factory": "'file.py:function' (checked by scm_graph.teacher.load_denoiser when it loads)",
    "train.eval_ref": "a reference statistics path, empty = none (checked at the start of training)",
    "train.eval_inception": "a weights folder, empty = clean-fid's (checked at the start of training)",
    "train.eval_dinov2": "a DINOv2 repository folder (checked at the start of training when fd_dinov2 is evaluated)",
    "train.keep_best": "an eval key of the run, empty = none (checked against the run's keys at the start of training)",
}


def _spec_dataclasses() -> list[type]:
    return [v for v in vars(specmod).values()
            if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == specmod.__name__]


def _leaves(cls: type = Spec, prefix: str = "") -> list[tuple[str, object, list[Check]]]:
    """(dotted name, bare type, Checks) of every leaf field under `cls`."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint, checks = hints[f.name], []
        if typing.get_origin(hint) is Annotated:
            hint, *meta = typing.get_args(hint)
            checks = [m for m in meta if isinstance(m, Check)]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint, checks))
    return out


def _nested(cls: type = Spec) -> set[type]:
    hints = typing.get_type_hints(cls)
    found = {cls}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= _nested(hints[f.name])
    return found


def test_every_spec_dataclass_is_reached_from_spec():
    """validate walks from Spec: a dataclass not reachable from it would never be checked."""
    assert set(_spec_dataclasses()) == _nested(Spec)


def _literal_tuple(tp) -> bool:
    """tuple[Literal[...], ...]: every entry is checked against the choices."""
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and bool(args) and typing.get_origin(args[0]) is Literal


def test_every_field_has_its_valid_values_or_is_declared_free():
    unchecked = sorted(name for name, tp, checks in _leaves()
                       if not checks and tp is not bool and typing.get_origin(tp) is not Literal and not _literal_tuple(tp))
    assert unchecked == sorted(FREE_FIELDS), (
        "a field without a Check(...), Literal[...] or bool: give it its valid values in scm_graph/spec.py, "
        "or add it to FREE_FIELDS with the reason any value is valid")


def _numeric(tp) -> bool:
    if typing.get_origin(tp) is tuple:
        return all(a in (int, float) for a in typing.get_args(tp) if a is not Ellipsis)
    return tp in (int, float)


def test_every_check_fits_its_field():
    """A Check that cannot apply to its field's type checks nothing: bounds on numbers, patterns (read in
    words) on strings, nonempty on tuples."""
    bad = []
    for name, tp, checks in _leaves():
        for c in checks:
            if c.describe() and not _numeric(tp):
                bad.append(f"{name}: bounds on {tp}")
            if c.pattern is not None and (tp is not str or not c.means):
                bad.append(f"{name}: a pattern needs a str field and `means`")
            if c.nonempty and typing.get_origin(tp) is not tuple:
                bad.append(f"{name}: nonempty on {tp}")
            if not (c.describe() or c.pattern is not None or c.nonempty):
                bad.append(f"{name}: an empty Check()")
    assert not bad, bad


def test_defaults_and_spec_files_are_valid():
    validate(Spec())
    for path in SPEC_FILES:
        validate(read_spec_file(path))


def test_label_dropout_of_specs_written_before_it_existed_is_zero():
    """A run written before label dropout had none: its spec JSON reads as 0, not today's default 0.1."""
    d = json.loads(spec_to_json(Spec()))
    del d["objective"]["label_dropout"]
    assert spec_from_json(json.dumps(d)).objective.label_dropout == 0.0
    assert spec_from_json(spec_to_json(Spec())).objective.label_dropout == Spec().objective.label_dropout == 0.1


def test_time_scale_and_eval_t_mid_round_trip_and_default_for_older_specs():
    """Both fields travel in the spec JSON (so in every checkpoint); a spec written before they existed reads as
    the behaviour it had: c_noise(t) = t and 2-step samples at t_mid = 1.1."""
    from scm_graph import trigflow

    spec = apply_overrides(Spec(), ["--net.time_scale", "1000", "--train.eval_t_mid", "0.821"])
    back = spec_from_json(spec_to_json(spec))
    assert back == spec and (back.net.time_scale, back.train.eval_t_mid) == (1000.0, 0.821)
    d = json.loads(spec_to_json(Spec()))
    del d["net"]["time_scale"], d["train"]["eval_t_mid"]
    old = spec_from_json(json.dumps(d))
    assert (old.net.time_scale, old.train.eval_t_mid) == (1.0, trigflow.T_MID) and old == Spec()


def test_eval_t_mids_bound_is_trigflows_t_max():
    """validate's t_max (spec.py cannot import trigflow) is trigflow.t_max for any sigma_d."""
    import math

    from scm_graph import trigflow

    for sigma_d in (0.5, 1.0, 80.0, 400.0):
        tm = trigflow.t_max(sigma_d)
        ok = Spec(objective=ObjectiveSpec(sigma_d=sigma_d), train=TrainSpec(eval_t_mid=math.nextafter(tm, 0)))
        validate(ok)
        bad = dataclasses.replace(ok, train=TrainSpec(eval_t_mid=tm))
        assert one_line_error(validate, bad).startswith("train.eval_t_mid must be below t_max")
