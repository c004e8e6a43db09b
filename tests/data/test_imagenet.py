"""`shard imagenet`: listing and labels, the ADM / EDM2 centre crop against PIL, pixel and latent sets read back with
tarfile + numpy, skipped unreadable images, resuming a stopped job, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scm_graph.data.codec import LatentCodec, PixelCodec
from scm_graph.data.imagenet import list_imagenet, read_image
from scm_graph.shard import main
from tests.data.setfiles import digest
from tests.helpers import assert_user_error, make_tiny_vae, run_cli

CLASSES = ("n01440764", "n01443537", "n02085620")  # written out of order below; labels follow the sorted names


def _jpeg(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * (c + 2) + yy * (4 - c) + 40 * c) % 256 for c in range(3)], -1) + rng.normal(0, 25, (h, w, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode).save(path, format="JPEG", quality=92)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageNet root: train/<wnid>/*.JPEG (10 images of varied sizes, a CMYK one, one nested), a corrupt
    JPEG and a .txt."""
    root = tmp_path_factory.mktemp("imagenet")
    train = root / "train"
    sizes = [(50, 40), (37, 64), (64, 64), (90, 33), (40, 40), (33, 70), (120, 80), (45, 45), (70, 50), (36, 36)]
    for i, (w, h) in enumerate(sizes):
        cls = CLASSES[(2 - i) % 3]
        _jpeg(train / cls / ("deep" if i == 4 else "") / f"{cls}_{i}.JPEG", w, h, i, "CMYK" if i == 6 else "RGB")
    (train / CLASSES[1] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (train / CLASSES[2] / "synset.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def _expected_order(train: Path) -> list[str]:
    """The write order, computed here: the image files by relative path, permuted with seed 0."""
    files = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.JPEG"))
    return [files[i] for i in np.random.default_rng(0).permutation(len(files))]


def _read_back(folder: Path) -> tuple[dict, dict[int, dict[str, bytes]]]:
    """(manifest, input index -> members) with tarfile only; checks each sample's sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples: dict[int, dict[str, bytes]] = {}
    for shard, count in zip(manifest["shards"], manifest["shard_counts"]):
        with tarfile.open(folder / shard) as tf:
            got = {}
            for member in tf:
                key, ext = member.name.split(".", 1)
                got.setdefault(int(key), {})[ext] = tf.extractfile(member).read()
        assert len(got) == count, shard
        samples.update(got)
    for key, members in samples.items():
        assert members.pop("sha256").decode() == digest(members), key
    return manifest, samples


def _reference_crop(img: Image.Image, r: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """ADM / EDM2's crop written out with PIL: BOX-halve while the shorter side >= 2r, BICUBIC the shorter side to r
    (the longer one rounded), then crop the centre r x r box. Returns the HWC array and the sizes it went through."""
    sizes = [img.size]
    while min(img.size) >= 2 * r:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
        sizes.append(img.size)
    w, h = img.size
    size = (r, max(r, round(h * r / w))) if w <= h else (max(r, round(w * r / h)), r)
    img = img.resize(size, resample=Image.Resampling.BICUBIC)
    sizes.append(size)
    left, top = (size[0] - r) // 2, (size[1] - r) // 2
    return np.asarray(img.crop((left, top, left + r, top + r))), sizes


def test_center_crop_matches_a_pil_reference(tmp_path: Path):
    # 300x200 at 16: halve to 150x100, 75x50, 37x25 (25 < 32 stops); bicubic to 24x16; crop x 4..20
    _, sizes = _reference_crop(Image.new("RGB", (300, 200)), 16)
    assert sizes == [(300, 200), (150, 100), (75, 50), (37, 25), (24, 16)]
    rng = np.random.default_rng(0)
    for i, ((w, h), r) in enumerate([((300, 200), 16), ((50, 120), 16), ((64, 64), 32), ((129, 40), 32),
                                     ((33, 33), 32), ((20, 50), 32), ((1000, 999), 64)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(arr).save(path)
        want, _ = _reference_crop(Image.fromarray(arr), r)
        got = read_image(path, r)
        assert isinstance(got, np.ndarray) and got.shape == (3, r, r) and got.dtype == np.uint8, (w, h, r)
        np.testing.assert_array_equal(got.transpose(1, 2, 0), want, err_msg=f"{w}x{h} at {r}")
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(gray)
    np.testing.assert_array_equal(read_image(gray, 16).transpose(1, 2, 0),
                                  _reference_crop(Image.open(gray).convert("RGB"), 16)[0])
    (tmp_path / "bad.JPEG").write_bytes(b"garbage")
    assert isinstance(read_image(tmp_path / "bad.JPEG", 16), str)  # a reason, not an exception


def test_listing_labels_and_order(tree: Path):
    files = list_imagenet(tree)
    assert files == list_imagenet(tree / "train")  # the root holding train/, or the class folders themselves
    assert files.root == (tree / "train").resolve() and files.class_names == CLASSES
    assert list(files.files) == _expected_order(tree / "train")
    assert [CLASSES[label] for label in files.labels] == [f.split("/")[0] for f in files.files]
    assert files.skipped == ((".txt", f"{CLASSES[2]}/synset.txt"),)
    assert f"{CLASSES[1]}/deep/{CLASSES[1]}_4.JPEG" in files.files  # nested folders inside a class are searched


def _shard(tree: Path, out: Path, *extra: str) -> None:
    main(["imagenet", "--src", str(tree), "--out", str(out), "--shard-size", "3", *extra])


def test_pixel_set(tree: Path, tmp_path: Path, capsys):
    _shard(tree, tmp_path, "--resolution", "16")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"skipped 1 file: 1 .txt ({CLASSES[2]}/synset.txt)"
    assert lines[1] == f"skipped 1 file: 1 unreadable ({CLASSES[1]}/broken.JPEG)"
    assert lines[2].startswith("wrote 10 images 3x16x16 (3 classes) in 4 shard(s), ") and "imagenet16" in lines[2]
    assert len(lines) == 3
    m, samples = _read_back(tmp_path / "imagenet16")
    order = _expected_order(tree / "train")
    bad = order.index(f"{CLASSES[1]}/broken.JPEG")
    assert sorted(samples) == [i for i in range(11) if i != bad]
    assert m["count"] == 10 and m["shape"] == [3, 16, 16] and m["dtype"] == "uint8" and m["format"] == "png"
    assert m["labels"] is True and m["num_classes"] == 3 and m["class_names"] == list(CLASSES)
    assert m["shards"] == [f"shard-{k:06d}.tar" for k in range(4)] and sum(m["shard_counts"]) == 10
    assert m["shard_bytes"] == [(tmp_path / "imagenet16" / s).stat().st_size for s in m["shards"]]
    assert m["sample_checksum"] == "sha256" and "latent" not in m
    assert m["source"].endswith("; 1 unreadable image skipped") and str((tree / "train").resolve()) in m["source"]
    assert sorted(p.name for p in (tmp_path / "imagenet16").iterdir()) == sorted(m["shards"] + ["manifest.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["imagenet16"]  # the partial folder is gone
    images = []
    for i, members in samples.items():
        assert set(members) == {"png", "cls"}
        assert int(members["cls"]) == CLASSES.index(order[i].split("/")[0])
        img = np.asarray(Image.open(io.BytesIO(members["png"]))).transpose(2, 0, 1)
        np.testing.assert_array_equal(img, read_image(tree / "train" / order[i], 16))
        images.append(img)
    x = np.stack(images).astype(np.float64)
    np.testing.assert_allclose(m["mean"], x.mean((0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(m["std"], x.std((0, 2, 3)), rtol=1e-13)


def test_decoding_processes_give_the_same_set(tree: Path, tmp_path: Path):
    _shard(tree, tmp_path / "one", "--resolution", "16")
    _shard(tree, tmp_path / "two", "--resolution", "16", "--jobs", "2")
    assert _files(tmp_path / "one" / "imagenet16") == _files(tmp_path / "two" / "imagenet16")


@pytest.mark.parametrize("dtype,stored", [("float16", "mean_std"), ("float32", "mean")])
def test_latent_set(tree: Path, vae_dir: Path, tmp_path: Path, capsys, dtype: str, stored: str):
    _shard(tree, tmp_path, "--resolution", "32", "--vae", str(vae_dir), "--device", "cpu", "--batch", "2",
           "--dtype", dtype, "--latent", stored)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"wrote 10 latents 4x4x4 ({stored}, {dtype}) of 32 px images (3 classes) in 4 shard(s)")
    assert last.endswith(" images/s") and "imagenet32-sdvae" in last
    m, samples = _read_back(tmp_path / "imagenet32-sdvae")
    assert m["format"] == "npy" and m["dtype"] == dtype and m["shape"] == [4, 4, 4] and m["count"] == 10
    assert m["latent"] == {"vae": str(vae_dir.resolve()), "scaling_factor": 0.18215, "stored": stored,
                           "image_resolution": 32}
    order = _expected_order(tree / "train")
    arrays = {}
    for i, members in samples.items():
        assert set(members) == {"npy", "cls"}
        assert int(members["cls"]) == CLASSES.index(order[i].split("/")[0])
        a = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        assert a.dtype == dtype and a.shape == ((8 if stored == "mean_std" else 4), 4, 4)
        arrays[i] = a
    a = np.stack(list(arrays.values())).astype(np.float64)
    mean = a[:, :4]
    var = mean.var((0, 2, 3)) + ((a[:, 4:] ** 2).mean((0, 2, 3)) if stored == "mean_std" else 0)
    np.testing.assert_allclose(m["mean"], mean.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m["std"], np.sqrt(var), rtol=1e-12)
    # the stored posterior is the VAE's, computed here with diffusers directly
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    i = min(arrays)
    x = torch.from_numpy(read_image(tree / "train" / order[i], 32)[None]).float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    want = torch.cat([dist.mean, dist.std], 1)[0] if stored == "mean_std" else dist.mean[0]
    np.testing.assert_allclose(arrays[i].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("latents", [False, True])
def test_a_stopped_job_resumes_to_the_same_set(tree: Path, vae_dir: Path, tmp_path: Path, capsys, monkeypatch,
                                               latents: bool):
    args = ["--resolution", "32", "--vae", str(vae_dir), "--device", "cpu"] if latents else ["--resolution", "16"]
    name = "imagenet32-sdvae" if latents else "imagenet16"
    _shard(tree, tmp_path / "whole", *args)
    codec = LatentCodec if latents else PixelCodec
    real, calls = codec.encode, []

    def stop_at_shard_2(self, images):
        calls.append(len(images))
        if len(calls) == 3:  # one call per shard (batch >= 3): shards 0 and 1 are done
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(codec, "encode", stop_at_shard_2)
    with pytest.raises(SystemExit) as e:
        _shard(tree, tmp_path / "cut", *args)
    assert e.value.code == 130
    partial = tmp_path / "cut" / f".{name}.partial"
    assert sorted(p.name for p in (partial / "done").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    assert sorted(p.name for p in (partial / "set").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (partial / "writer.pid").exists()
    capsys.readouterr()
    monkeypatch.setattr(codec, "encode", real)
    _shard(tree, tmp_path / "cut", *args)
    out = capsys.readouterr().out.splitlines()
    assert f"resuming: 2 of 4 shards done ({partial})" in out
    assert [p.name for p in (tmp_path / "cut").iterdir()] == [name]
    assert _files(tmp_path / "cut" / name) == _files(tmp_path / "whole" / name)


def test_partial_folder_of_other_settings_or_in_use(tree: Path, tmp_path: Path, capsys, monkeypatch):
    def interrupt(self, images):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PixelCodec, "encode", interrupt)
        with pytest.raises(SystemExit):
            _shard(tree, tmp_path, "--resolution", "16")
    partial = tmp_path / ".imagenet16.partial"
    assert (partial / "job.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["imagenet", "--src", str(tree), "--out", str(tmp_path), "--shard-size", "5", "--resolution", "16"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {partial} holds an unfinished job with other settings "
                                       "(shard_size 3 -> 5); pass --force to discard it and start over\n")
    (partial / "writer.pid").write_text(f"{os.getppid()}\n")  # a live process holds it
    with pytest.raises(SystemExit) as e:
        _shard(tree, tmp_path, "--resolution", "16", "--force")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {partial} is being written by process {os.getppid()}; ") and err.count("\n") == 1
    (partial / "writer.pid").unlink()
    main(["imagenet", "--src", str(tree), "--out", str(tmp_path), "--shard-size", "5", "--resolution", "16", "--force"])
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((tmp_path / "imagenet16" / "manifest.json").read_text())["shard_counts"] == [5, 4, 1]  # 11 files, one unreadable
    assert not partial.exists()
    with pytest.raises(SystemExit) as e:  # an existing set needs --force, as for every source
        _shard(tree, tmp_path, "--resolution", "16")
    assert capsys.readouterr().err == f"error: {tmp_path / 'imagenet16'} already exists; pass --force to replace it\n"


def test_bad_input_is_one_line(tree: Path, vae_dir: Path, tmp_path: Path, capsys):
    flat = tmp_path / "flat"
    _jpeg(flat / "a.JPEG", 20, 20, 0)
    no_vae = tmp_path / "not_a_vae"
    no_vae.mkdir()
    out = tmp_path / "out"
    in_subprocess = [
        (["--src", flat, "--resolution", "16"], f"--src {flat} has no class sub-folders"),
        (["--src", tmp_path / "missing", "--resolution", "16"], f"--src {tmp_path / 'missing'} does not exist"),
        (["--src", tree, "--resolution", "16", "--vae", no_vae], f"--vae {no_vae} is not a diffusers AutoencoderKL folder"),
        (["--src", tree, "--resolution", "20", "--vae", vae_dir],
         "--resolution 20 is not divisible by the VAE's downsampling factor 8"),
    ]
    for args, line in in_subprocess:
        assert_user_error(run_cli("scm_graph.shard", "imagenet", *args, "--out", out), line)
    in_process = [
        (["--src", tree, "--resolution", "16", "--dtype", "float32"], "--dtype only applies with --vae"),
        (["--src", tree, "--resolution", "0"], "--resolution must be positive, not 0"),
        (["--src", tree, "--resolution", "32", "--vae", vae_dir, "--batch", "0"], "--batch must be at least 1, not 0"),
        (["--src", tree, "--resolution", "16", "--jobs", "0"], "--jobs must be at least 1, not 0"),
    ]
    for args, line in in_process:
        with pytest.raises(SystemExit) as e:
            main(["imagenet", *map(str, args), "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {line}") and err.count("\n") == 1, err
    assert not out.exists()  # nothing written
