"""Checkpoints written by scm_graph 0.1 (format 1, flat `net` spec, `map0`-style layer names) load, sample
and resume exactly.

tests/fixtures/legacy_v1/ holds two tiny runs written by the code before the package layout change (a
class-conditional U-Net sCT run with attention and dropout, and a class-conditional DiT diffusion run),
each stopped after 2 steps, together with what that code computed from them: 4 samples, and the losses
of steps 3 and 4 when the run was resumed. `make.py` there is the script that wrote them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scm_graph.checkpoint import FORMAT, load_checkpoint, read_metadata
from scm_graph.sample.generate import generate, load_generator
from scm_graph.spec import spec_from_json
from tests.helpers import PAPER_SCT, REPO, TorchDefaults, step_records, train_main

FIXTURES = REPO / "tests" / "fixtures" / "legacy_v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())

# The runs' settings in today's flags (make.py used the flat 0.1 flags).
ARGS = {
    "unet_sct": ["digits_sct.py", "--net.unet.channels", "4", "--net.unet.emb_mult", "2", "--net.unet.channel_mult", "1", "2",
                 "--net.unet.num_blocks", "1", "--net.unet.norm_groups", "4", "--net.unet.attn_resolutions", "4",
                 "--net.unet.head_dim", "4", *PAPER_SCT],  # digits_sct's settings when the fixture was written
    # label dropout (classifier-free guidance) came later: the old run had none, and --resume insists on the same value
    "dit_diffusion": ["digits_diffusion.py", "--net.arch", "dit", "--net.dit.width", "16", "--net.dit.depth", "1",
                      "--net.dit.head_dim", "8", "--net.dit.patch_size", "2", "--net.dit.emb_mult", "1",
                      "--objective.label_dropout", "0"],
}
COMMON = ["--train.batch", "16", "--train.log_every_images", "16", "--train.eval_every_images", "0",
          "--train.eval_samples", "64", "--train.sample_every_images", "1000000", "--train.compile", "false",
          "--train.device", "cpu", "--net.class_conditional", "true", "--net.dropout", "0.1"]


@pytest.mark.parametrize("name", sorted(ARGS))
def test_legacy_checkpoint_loads_with_todays_names(name: str):
    path = FIXTURES / f"{name}.safetensors"
    assert read_metadata(path)["format"] == "scm_graph.checkpoint/1" != FORMAT
    ck = load_checkpoint(path)
    assert not any(".map" in k for k in ck.net) and {"net.emb.fc0.weight", "net.emb.fc1.weight", "net.emb.label.weight"} <= ck.net.keys()
    assert ck.ema.keys() == ck.net.keys()
    spec = spec_from_json(ck.spec_json)
    assert spec.net.class_conditional and spec.net.dropout == 0.1
    if name == "unet_sct":
        assert (spec.net.arch, spec.net.unet.channels, spec.net.unet.attn_resolutions, spec.net.unet.head_dim) == ("unet", 4, (4,), 4)
    else:
        assert (spec.net.arch, spec.net.dit.width, spec.net.dit.depth, spec.net.dit.head_dim) == ("dit", 16, 1, 8)
    # the optimiser state is indexed by parameter position: today's model lists its parameters in the old order
    from scm_graph.model import build_model

    model = build_model(spec)
    for i, (k, p) in enumerate(model.named_parameters()):
        assert ck.optim["state"][i]["exp_avg"].shape == p.shape, k


@pytest.mark.parametrize("name", sorted(ARGS))
def test_legacy_checkpoint_samples_what_it_sampled_before(name: str, torch_defaults):
    g = load_generator(FIXTURES / f"{name}.safetensors", device="cpu")
    if g.is_consistency:
        x = generate(g, 4, steps=2, seed=0)
    else:
        x = generate(g, 4, steps=3, solver="heun", seed=0)
    torch.testing.assert_close(x, load_file(str(FIXTURES / "expected_samples.safetensors"))[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_legacy_checkpoint_resumes_exactly(name: str, tmp_path: Path, shard_root: Path, scm_cache: Path):
    """Resumed from step 2 with today's code, steps 3 and 4 have the losses the old code computed."""
    run = tmp_path / name
    run.mkdir()
    shutil.copy(FIXTURES / f"{name}.safetensors", run / "ckpt.safetensors")
    with TorchDefaults():
        train_main(ARGS[name][0], *ARGS[name][1:], *COMMON, "--data.root", str(shard_root), "--train.out", str(run),
                   "--train.total_images", "64", "--resume")
    losses = {step: r["loss"] for step, r in step_records(run).items()}
    want = EXPECTED[name]["losses"]
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(want[str(step)], rel=1e-5, abs=1e-7), (step, losses[step], want[str(step)])
    ck = load_checkpoint(run / "ckpt.safetensors")
    assert read_metadata(run / "ckpt.safetensors")["format"] == FORMAT and (ck.step, ck.images) == (4, 64)
