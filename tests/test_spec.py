"""The spec dataclasses: spec files' content, the JSON round trip (and the 0.1 layout), value checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from scm_graph.spec import DiTSpec, NetSpec, Spec, UNetSpec, spec_from_json, spec_to_json, validate
from scm_graph.specfile import apply_overrides, read_spec_file
from tests.helpers import SPECS, one_line_error

SPEC_FILES = sorted(SPECS.glob("*.py"))


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
