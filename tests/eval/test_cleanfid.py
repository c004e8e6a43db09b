"""FID against the real clean-fid library: its resize, its folder pipeline, its Frechet distance, its features.

No Inception weights are downloaded: `random_fid_inception` builds a randomly initialised network of the same
architecture as clean-fid's TorchScript `inception-2015-12-05.pt` (pytorch-fid's FID Inception blocks from
`cleanfid.inception_pytorch`), scripts it and saves it under pytest's tmp folder, where both clean-fid's
`InceptionV3W(folder, download=False)` and our `InceptionFeatures(folder)` load it. Weights do not matter
here: both pipelines must feed the same network the same tensors.

Skipped where clean-fid (or the torchvision it imports) does not import. Run by CI in its second environment:
`just test-cleanfid`. Inception at 299 x 299 costs ~0.1-0.6 s per image on 2 CPU cores, so the sets are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # torchvision can be installed but broken beside another torch build (RuntimeError, not ImportError)
    import cleanfid.fid as cf_fid
    import cleanfid.inception_pytorch as cf_inception
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset
except Exception as e:  # noqa: BLE001
    pytest.skip(f"clean-fid does not import here ({type(e).__name__}: {e})", allow_module_level=True)

from scm_graph.eval.frechet import FeatureStats, frechet_distance
from scm_graph.eval.inception import INCEPTION_FILE, InceptionFeatures
from scm_graph.eval.refs import load_refs
from scm_graph.eval.stream import featurize
from tests.helpers import run_cli

pytestmark = [
    pytest.mark.cleanfid,
    pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:FutureWarning"),  # torch.jit.script / load are deprecated
]

BATCH = 16  # one batch per set in both pipelines, so the network sees identical input tensors


# ---------------------------------------------------------------------------------------------
# A randomly initialised FID Inception, saved the way clean-fid expects it


class _ScriptedInception(torch.nn.Module):
    """The interface `InceptionV3W` uses: `.layers` maps (x - 128) / 128 at 299 x 299 to pool3 [N, 2048, 1, 1];
    `forward(x, return_features)` (its legacy_tensorflow mode) resizes 0..255 images itself."""

    def __init__(self, layers: torch.nn.Sequential, fc: torch.nn.Linear) -> None:
        super().__init__()
        self.layers = layers
        self.output = fc

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).flatten(1)
        if return_features:
            return features
        return self.output(features)


def random_fid_inception(seed: int = 0) -> torch.jit.ScriptModule:
    """pytorch-fid's `fid_inception_v3` architecture (torchvision's Inception-v3 with 1008 classes and no aux
    head, its Mixed_5b..7c replaced by the FID blocks of TensorFlow's graph) with random weights, trunk up to
    the final average pool as `layers`, scripted. The BatchNorm running statistics are set from one batch of
    random 299 x 299 inputs, so activations neither vanish nor blow up through the ~50 layers (PyTorch's default
    conv init alone gives pool3 features of ~1e-8)."""
    torch.manual_seed(seed)
    inc = cf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # init_weights=False
    inc.Mixed_5b = cf_inception.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = cf_inception.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = cf_inception.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = cf_inception.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = cf_inception.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = cf_inception.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = cf_inception.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = cf_inception.FIDInceptionE_1(1280)
    inc.Mixed_7c = cf_inception.FIDInceptionE_2(2048)
    pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
    layers = torch.nn.Sequential(  # pytorch-fid's InceptionV3 blocks 0..3
        inc.Conv2d_1a_3x3, inc.Conv2d_2a_3x3, inc.Conv2d_2b_3x3, pool,
        inc.Conv2d_3b_1x1, inc.Conv2d_4a_3x3, pool,
        inc.Mixed_5b, inc.Mixed_5c, inc.Mixed_5d, inc.Mixed_6a, inc.Mixed_6b, inc.Mixed_6c, inc.Mixed_6d, inc.Mixed_6e,
        inc.Mixed_7a, inc.Mixed_7b, inc.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1)),
    )
    for m in layers.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := this batch's stats
    layers.train()
    with torch.no_grad():
        layers(torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return torch.jit.script(_ScriptedInception(layers, inc.fc).eval())


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory) -> Path:
    """A tmp folder holding a random FID Inception as `inception-2015-12-05.pt` (never clean-fid's /tmp copy)."""
    folder = tmp_path_factory.mktemp("inception")
    torch.jit.save(random_fid_inception(), str(folder / INCEPTION_FILE))
    return folder


def cleanfid_model_fn(folder: Path, record: list[np.ndarray] | None = None):
    """What clean-fid's `feature_extractor("torchscript_inception")` returns, but from `folder`, without a
    download or DataParallel; each batch's features are appended to `record`."""
    model = InceptionV3W(str(folder), download=False, resize_inside=False).eval()

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        f = model(x)
        if record is not None:
            record.append(f.detach().cpu().numpy().copy())
        return f

    return model_fn


class Recording:
    """A FeatureNet that records what the wrapped one returns."""

    def __init__(self, net: InceptionFeatures) -> None:
        self.net, self.metric, self.dim, self.out = net, net.metric, net.dim, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        f = self.net(images)
        self.out.append(f.detach().cpu().numpy().copy())
        return f


# ---------------------------------------------------------------------------------------------
# Images and PNG folders


def write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    """uint8 [N, C, H, W] (C = 1: mode L, C = 3: RGB) as folder/000.png ... (sorted = index order, as clean-fid
    lists a folder); returns the paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{i:03d}.png"
        Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(p)
        paths.append(str(p))
    return paths


def blocky_images(n: int, seed: int, contrast: float, offset: float) -> np.ndarray:
    """uint8 [n, 3, 32, 32]: a random 4 x 4 colour pattern upsampled by 8, plus pixel noise, scaled by
    `contrast` around `offset` (two settings give two distinct distributions)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    x = offset + contrast * (coarse - 128) + rng.normal(0, 12, size=(n, 3, 32, 32))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def batches(images: np.ndarray, size: int = BATCH):
    for i in range(0, len(images), size):
        yield torch.from_numpy(images[i : i + size])


# ---------------------------------------------------------------------------------------------
# Tests


def test_random_inception_has_the_torchscript_interface(inception_dir: Path):
    """The saved file loads in clean-fid's `InceptionV3W` and gives finite, image-dependent [N, 2048] features."""
    base = torch.jit.load(str(inception_dir / INCEPTION_FILE))
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        pool3 = base.layers((x - 128) / 128)
        f = cleanfid_model_fn(inception_dir)(x)
    assert pool3.shape == (2, 2048, 1, 1) and f.shape == (2, 2048)
    assert torch.equal(f, pool3.view(2, 2048))
    assert torch.isfinite(f).all() and f.std() > 1e-3 and (f[0] - f[1]).abs().max() > 1e-4


def test_resized_matches_cleanfid_resize_dataset(inception_dir: Path, tmp_path: Path):
    """`InceptionFeatures.resized` is bit for bit what clean-fid's ResizeDataset (mode "clean") gives for PNGs
    of the same uint8 images: 32 x 32 RGB (0 and 255 included, so the clip shows) and 8 x 8 grey (-> RGB)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    rgb[0, :, :16] = 0
    rgb[0, :, 16:] = 255  # a hard edge: bicubic overshoots, clean-fid clips to 0..255
    grey = rng.integers(0, 256, size=(3, 1, 8, 8), dtype=np.uint8)
    net = InceptionFeatures(str(inception_dir))
    for images, name in ((rgb, "rgb"), (grey, "grey")):
        ds = ResizeDataset(write_pngs(images, tmp_path / name), mode="clean")
        theirs = torch.stack([ds[i] for i in range(len(ds))])
        ours = net.resized(torch.from_numpy(images))
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (len(images), 3, 299, 299)
        assert torch.equal(ours, theirs), (name, (ours - theirs).abs().max().item())


@pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")  # n < 2048: expected
def test_fid_matches_cleanfid_compute_fid(inception_dir: Path, tmp_path: Path, capsys):
    """clean-fid's own `compute_fid` of two PNG folders (10 and 12 images) against ours: `featurize` with
    `InceptionFeatures`, float64 `Moments`, `frechet_distance`.

    Features: bit for bit (same network, same input tensor, same batch). Moments: clean-fid's np.mean of the
    float32 features accumulates in float32 (relative error ~1e-7), np.cov in float64; ours are float64 sums
    -> rtol 1e-6 on mu, atol 1e-9 * max|sigma| on sigma (measured: 1e-7 and 6e-14). FID: with n < 2048 both
    covariances are singular (rank 9 and 11): scipy's sqrtm of the singular product S_a S_b warns and carries
    rounding noise from its ~2030 zero eigenvalues, ours takes the eigenvalues of a symmetric PSD matrix, and
    clean-fid's mu is float32; measured 1.5e-7 relative apart, so rtol 1e-5. clean-fid must not have fallen
    back to its eps * I offset (it prints when it does), which would change its FID by more than that."""
    a = blocky_images(10, seed=1, contrast=1.0, offset=128)
    b = blocky_images(12, seed=2, contrast=0.5, offset=100)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    write_pngs(a, dir_a)
    write_pngs(b, dir_b)

    record: list[np.ndarray] = []
    theirs = cf_fid.compute_fid(str(dir_a), str(dir_b), mode="clean",
                                custom_feat_extractor=cleanfid_model_fn(inception_dir, record),
                                device=torch.device("cpu"), num_workers=0, batch_size=BATCH, use_dataparallel=False,
                                verbose=False)
    assert "singular product" not in capsys.readouterr().out  # no eps * I fallback
    assert len(record) == 2  # one batch per folder
    feats_a, feats_b = record

    net = Recording(InceptionFeatures(str(inception_dir)))
    stats = [featurize(batches(x), [net])["fid"].stats() for x in (a, b)]
    ours = frechet_distance(*stats)

    np.testing.assert_array_equal(net.out[0], feats_a)
    np.testing.assert_array_equal(net.out[1], feats_b)
    for s, f in zip(stats, (feats_a, feats_b)):
        assert s.n == len(f)
        mu = np.mean(f, axis=0)
        np.testing.assert_allclose(s.mu, mu, rtol=1e-6, atol=1e-7 * np.abs(mu).max())
        sigma = np.cov(f, rowvar=False)
        np.testing.assert_allclose(s.sigma, sigma, rtol=0, atol=1e-9 * np.abs(sigma).max())
    assert np.isfinite(theirs) and theirs > 1e-3
    assert ours == pytest.approx(float(theirs), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_cleanfid(seed: int):
    """Our eigh-based `frechet_distance` equals clean-fid's scipy-sqrtm one on well-conditioned Gaussians
    (d = 16, covariances A A^T / d + 0.1 I: eigenvalues >= 0.1, so sqrtm is accurate to ~1e-13) -> rtol 1e-8."""
    rng = np.random.default_rng(seed)
    d = 16

    def gaussian() -> FeatureStats:
        m = rng.normal(size=(d, d))
        return FeatureStats(mu=rng.normal(size=d), sigma=m @ m.T / d + 0.1 * np.eye(d), n=100)

    x, y = gaussian(), gaussian()
    theirs = float(cf_fid.frechet_distance(x.mu, x.sigma, y.mu, y.sigma))
    assert theirs > 1.0
    assert frechet_distance(x, y) == pytest.approx(theirs, rel=1e-8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)


def test_eval_ref_cli_matches_cleanfid_folder_features(inception_dir: Path, shard_root: Path, tmp_path: Path):
    """`python -m scm_graph.eval ref --metric fid` over the first 12 digits of a shard set writes the mean and
    covariance that np.mean / np.cov give of clean-fid's `get_folder_features` of PNGs of the same 8 x 8 grey
    images. The CLI runs in another process (one thread, as this one under tests/eval's conftest, but nothing
    guarantees the same convolution kernels): features computed with 1 and 2 threads differ by ~3e-7 relative,
    their covariances by ~3e-6 * max|sigma|. Tolerances: rtol 1e-5 (+ atol 1e-6 * max|mu|) on mu, atol
    1e-4 * max|sigma| on sigma (ddof 0 instead of 1 alone would be 9% off)."""
    from scm_graph.data.stream import read_all
    from scm_graph.spec import DataSpec

    n = 12
    out = tmp_path / "ref.npz"
    res = run_cli("scm_graph.eval", "ref", "--shards", shard_root / "digits", "--out", out, "--metric", "fid",
                  "--inception", inception_dir, "--device", "cpu", "--n", str(n), "--batch", str(BATCH),
                  cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    ours = load_refs(out, ["fid"])["fid"]
    assert ours.n == n

    stream = read_all(DataSpec(name="digits", root=str(shard_root)))
    digits = np.stack([np.frombuffer(raw, np.uint8).reshape(1, 8, 8) for raw, _ in (next(stream) for _ in range(n))])
    write_pngs(digits, tmp_path / "png")
    feats = cf_fid.get_folder_features(str(tmp_path / "png"), cleanfid_model_fn(inception_dir), num_workers=0,
                                       batch_size=BATCH, device=torch.device("cpu"), mode="clean", verbose=False)
    assert feats.shape == (n, 2048)
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    np.testing.assert_allclose(ours.mu, mu, rtol=1e-5, atol=1e-6 * np.abs(mu).max())
    np.testing.assert_allclose(ours.sigma, sigma, rtol=0, atol=1e-4 * np.abs(sigma).max())


def test_eval_cli_fid_of_a_checkpoint(inception_dir: Path, shard_root: Path, sct_ckpt: Path, tmp_path: Path):
    """End to end with the real clean-fid: `eval ref` of 16 digits, then `python -m scm_graph.eval --metric fid
    fd_digits` of a digits checkpoint's 10 samples. The FID equals the FD of clean-fid's Inception features of
    the same samples (generated here at their per-sample seeds) against that reference; the digits FD rides
    along in the same stream."""
    from scm_graph.sample.generate import generate, load_generator, to_uint8

    ref = tmp_path / "ref.npz"
    res = run_cli("scm_graph.eval", "ref", "--shards", shard_root / "digits", "--out", ref, "--metric", "fid",
                  "--inception", inception_dir, "--device", "cpu", "--n", "16", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    res = run_cli("scm_graph.eval", "--ckpt", sct_ckpt, "--steps", "2", "--metric", "fid", "fd_digits", "--ref", ref,
                  "--inception", inception_dir, "--n", "10", "--batch", "4", "--device", "cpu", "--json",
                  cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]
    assert set(row) >= {"fid", "fd"} and row["n"] == 10
    g = load_generator(sct_ckpt, device="cpu")
    images = to_uint8(generate(g, 10, steps=2, seed=0, sample_ids=torch.arange(10)), g.spec)
    feats = InceptionFeatures(str(inception_dir))(images).double().numpy()
    expected = frechet_distance(FeatureStats.of(feats), load_refs(ref, ["fid"])["fid"])
    assert row["fid"] == pytest.approx(expected, rel=1e-4)  # another process: features agree to ~3e-7 (see above)
