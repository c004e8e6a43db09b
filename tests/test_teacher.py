"""EDM <-> TrigFlow teachers in float64 against Gaussian closed forms, and the user's denoiser hook."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from scm_graph.errors import UserError
from scm_graph.teacher import EDMPrecond, EDMVelocity, TrigFlowAsEDM, load_denoiser, one_hot_labels

SD, S0 = 0.5, 0.8  # sigma_d != data std, so a dropped or misplaced sigma_d shows
SHAPE = (2, 3, 3)
T_MAX = math.atan(80 / SD)
TIMES = (0.01, 0.2, 0.7, 1.1, 1.5, T_MAX)


def _mu() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


class GaussianDenoiser(nn.Module):
    """The exact EDM denoiser of x0 ~ N(mu, s0^2 I): D(x, sigma) = mu + s0^2 / (s0^2 + sigma^2) (x - mu)."""

    def __init__(self, mu: torch.Tensor, s0: float):
        super().__init__()
        self.mu, self.s0 = mu, s0
        self.sigmas: list[torch.Tensor] = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma)
        s = sigma.reshape(-1, 1, 1, 1)
        return self.mu + self.s0**2 / (self.s0**2 + s**2) * (x - self.mu)


def _gaussian_velocity(x_t: torch.Tensor, t: float, mu: torch.Tensor) -> torch.Tensor:
    """E[cos t z - sin t x0 | x_t] for x0 ~ N(mu, S0^2), z ~ N(0, SD^2), by linear-Gaussian conditioning."""
    c, s = math.cos(t), math.sin(t)
    var = c**2 * S0**2 + s**2 * SD**2  # Var x_t
    r = x_t - c * mu  # x_t - E x_t
    e_x0 = mu + c * S0**2 / var * r  # Cov(x0, x_t) / Var x_t
    e_z = s * SD**2 / var * r  # Cov(z, x_t) / Var x_t
    return c * e_z - s * e_x0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("t", TIMES)
def test_edm_velocity_of_the_exact_denoiser_is_the_exact_velocity(t: float):
    mu = _mu()
    g = torch.Generator().manual_seed(1)
    x0 = mu + S0 * torch.randn(5, *SHAPE, generator=g, dtype=torch.float64)
    z = SD * torch.randn(5, *SHAPE, generator=g, dtype=torch.float64)
    x_t = math.cos(t) * x0 + math.sin(t) * z
    den = GaussianDenoiser(mu, S0)
    F = EDMVelocity(den, SD)(x_t, torch.full((5,), t, dtype=torch.float64))
    # Near t = 0, D ~ x_t and |v| ~ t |x_t|: (cos t x_t - D) / sin t loses ~eps / t^2 relative to |v| in any
    # implementation (1.8e-12 at t = 0.01); elsewhere 1e-12.
    tol = max(1e-12, 20 * torch.finfo(torch.float64).eps / math.sin(t) ** 2)
    assert _rel(SD * F, _gaussian_velocity(x_t, t, mu)) < tol  # sigma_d F = E[v_t | x_t]
    assert den.sigmas[0].shape == (5,)
    assert torch.allclose(den.sigmas[0], torch.full((5,), SD * math.tan(t), dtype=torch.float64), rtol=1e-15)


def test_edm_velocity_is_the_time_derivative_along_the_pf_ode():
    # For Gaussian data the PF-ODE keeps the standardised coordinate u fixed: x(t) = cos t mu + sqrt(Var x_t) u.
    mu = _mu()
    u = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def x_of(t: float) -> torch.Tensor:
        return math.cos(t) * mu + math.sqrt(math.cos(t) ** 2 * S0**2 + math.sin(t) ** 2 * SD**2) * u

    vel = EDMVelocity(GaussianDenoiser(mu, S0), SD)
    h = 1e-6
    for t in (0.05, 0.6, 1.3):
        fd = (x_of(t + h) - x_of(t - h)) / (2 * h)
        F = vel(x_of(t), torch.full((3,), t, dtype=torch.float64))
        assert _rel(SD * F, fd) < 1e-8  # dx_t/dt = sigma_d F


class TinyTrigFlow(nn.Module):
    """A small random TrigFlow-interface model: F(x_t / sigma_d, t, labels)."""

    sigma_d = 0.7

    def __init__(self, dim: int, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(3)
        self.num_classes = num_classes
        self.l1 = nn.Linear(dim + 1 + num_classes, 32, dtype=torch.float64)
        self.l2 = nn.Linear(32, dim, dtype=torch.float64)

    def forward(self, x_t, t, labels=None, dropout_key=None):
        n = self.num_classes
        lab = torch.zeros(len(x_t), n, dtype=x_t.dtype) if labels is None else one_hot_labels(labels, n, x_t.dtype)
        h = torch.cat([(x_t / self.sigma_d).flatten(1), t[:, None], lab], dim=1)
        return self.l2(torch.tanh(self.l1(h))).view_as(x_t)


def test_trigflow_to_edm_and_back_returns_F():
    m = TinyTrigFlow(math.prod(SHAPE))
    g = torch.Generator().manual_seed(4)
    x_t = 0.6 * torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.8, 1.2, 1.5, math.atan(80 / m.sigma_d)], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -1, 1, 0])
    back = EDMVelocity(TrigFlowAsEDM(m), m.sigma_d)
    for lab in (labels, None):
        F = m(x_t, t, lab)
        assert _rel(back(x_t, t, lab, dropout_key=torch.tensor(5)), F) < 1e-10
    assert _rel(back(x_t, t, labels), back(x_t, t, None)) > 1e-3  # the labels reached the model


def test_edm_to_trigflow_and_back_returns_D():
    mu = _mu()
    den = GaussianDenoiser(mu, S0)
    sig = TrigFlowAsEDM(EDMVelocity(den, SD))
    assert sig.sigma_d == SD
    x = 2.0 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = torch.tensor([0.005, 0.3, 2.0, 80.0], dtype=torch.float64)
    assert _rel(sig(x, sigma), den(x, sigma)) < 1e-10
    scalar = torch.tensor(1.5, dtype=torch.float64)  # EDM samplers pass a scalar sigma
    assert _rel(sig(x, scalar), den(x, scalar.expand(4))) < 1e-12


class Recorder(nn.Module):
    """A raw EDM network that records its inputs and returns a fixed nonlinear function of them."""

    def forward(self, x_in, c_noise, class_labels=None):
        self.seen = (x_in, c_noise, class_labels)
        return torch.sin(3 * x_in) + c_noise.reshape(-1, 1, 1, 1)


def test_edm_precond_coefficients():
    net, sd = Recorder(), 0.6
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.4, 3.0, 80.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, -1])
    D = EDMPrecond(net, sd)(x, sigma, labels)
    for i, s in enumerate(sigma.tolist()):  # EDM Table 1, one sample at a time in Python floats
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        c_noise = math.log(s) / 4
        assert torch.allclose(net.seen[0][i], c_in * x[i], rtol=1e-14, atol=0)
        assert abs(net.seen[1][i].item() - c_noise) < 1e-14
        raw = torch.sin(3 * c_in * x[i]) + c_noise
        assert torch.allclose(D[i], c_skip * x[i] + c_out * raw, rtol=1e-13, atol=1e-15)
    assert net.seen[1].shape == (4,)
    assert net.seen[2] is labels
    EDMPrecond(net, sd)(x, torch.tensor(0.4, dtype=torch.float64), None)  # a scalar sigma, as EDM samplers pass
    assert net.seen[1].shape == (4,) and net.seen[2] is None


def test_edm_preconditioned_net_is_minus_F():
    # c_skip = cos^2 t, c_out = sigma_d sin t, c_in = cos t / sigma_d at sigma = sigma_d tan t  =>  F = -F_edm
    net = Recorder()
    x_t = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t = torch.tensor([0.01, 0.4, 0.9, 1.4, T_MAX], dtype=torch.float64)
    F = EDMVelocity(EDMPrecond(net, SD), SD)(x_t, t)
    raw = Recorder()(x_t / SD, torch.log(SD * torch.tan(t)) / 4)
    assert _rel(F, -raw) < 1e-10


def test_one_hot_labels():
    oh = one_hot_labels(torch.tensor([2, -1, 0]), 3)
    assert oh.dtype == torch.float32
    assert torch.equal(oh, torch.tensor([[0.0, 0, 1], [0, 0, 0], [1, 0, 0]]))
    assert one_hot_labels(None, 3) is None


# --- load_denoiser -------------------------------------------------------------------------------

FACTORY = '''
import torch
from torch import nn
from neighbour_of_factory import SCALE


class Den(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("offset", torch.zeros(4, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        return self.drop(self.lin(x)) * SCALE + self.offset


def make():
    return Den()


def make_args(x):
    return Den()


def not_module():
    return 42


def boom():
    raise RuntimeError("boom\\nsecond line")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factory_dir(tmp_path: Path) -> Path:
    (tmp_path / "fac.py").write_text(FACTORY)
    (tmp_path / "neighbour_of_factory.py").write_text("SCALE = 2.0\n")
    return tmp_path


def _weights(folder: Path, **changes) -> Path:
    g = torch.Generator().manual_seed(9)
    state = {"lin.weight": torch.randn(4, 4, generator=g, dtype=torch.float64),
             "lin.bias": torch.randn(4, generator=g, dtype=torch.float64),
             "offset": torch.full((4,), 0.25, dtype=torch.float64)}
    for k, v in changes.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    path = folder / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path


def test_load_denoiser_applies_weights_and_freezes(factory_dir: Path):
    before = list(sys.path)
    w = _weights(factory_dir)
    den = load_denoiser(f"{factory_dir / 'fac.py'}:make", str(w))
    assert sys.path == before
    state = safetensors.torch.load_file(str(w))
    assert all(torch.equal(den.state_dict()[k], v) for k, v in state.items())
    assert not den.training and not any(m.training for m in den.modules())
    assert not any(p.requires_grad for p in den.parameters())
    x = torch.ones(2, 4, dtype=torch.float64)
    expect = (x @ state["lin.weight"].T + state["lin.bias"]) * 2.0 + 0.25  # eval: no dropout
    assert torch.equal(den(x, torch.ones(2)), expect)
    assert torch.equal(den(x, torch.ones(2)), den(x, torch.ones(2)))
    # without weights the factory's own are kept, still frozen
    den2 = load_denoiser(f"{factory_dir / 'fac.py'}:make", None)
    assert not den2.training and not any(p.requires_grad for p in den2.parameters())
    assert torch.equal(den2.offset, torch.zeros(4, dtype=torch.float64))


def _error(factory: str, weights: str | None) -> str:
    with pytest.raises(UserError) as e:
        load_denoiser(factory, weights)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_denoiser_factory_errors(factory_dir: Path):
    fac = factory_dir / "fac.py"
    assert _error("fac.py", None) == "teacher factory 'fac.py' must look like 'path/to/file.py:function_name'"
    assert _error(f"{fac}:", None) == f"teacher factory '{fac}:' must look like 'path/to/file.py:function_name'"
    missing = factory_dir / "missing.py"
    assert _error(f"{missing}:make", None) == f"teacher factory {missing} not found"
    txt = factory_dir / "fac.txt"
    txt.write_text(FACTORY)
    assert _error(f"{txt}:make", None) == f"teacher factory {txt} is not a .py file"
    folder = factory_dir / "pkg.py"
    folder.mkdir()
    assert _error(f"{folder}:make", None) == f"teacher factory {folder} is not a .py file"
    broken = factory_dir / "broken.py"
    broken.write_text("import no_such_module_for_scm_graph_tests\n")
    assert _error(f"{broken}:make", None) == (
        f"teacher factory {broken} cannot be imported "
        "(ModuleNotFoundError: No module named 'no_such_module_for_scm_graph_tests')")
    assert _error(f"{fac}:nope", None) == f"teacher factory {fac} has no function 'nope'"
    assert _error(f"{fac}:NOT_CALLABLE", None) == f"teacher factory {fac}: 'NOT_CALLABLE' is not a function"
    assert _error(f"{fac}:boom", None) == f"teacher factory {fac}:boom failed (RuntimeError: boom)"
    assert _error(f"{fac}:make_args", None) == (
        f"teacher factory {fac}:make_args failed (TypeError: make_args() missing 1 required positional argument: 'x')")
    assert _error(f"{fac}:not_module", None) == f"teacher factory {fac}:not_module returned int, not a torch.nn.Module"


def test_load_denoiser_weights_errors(factory_dir: Path):
    fac = f"{factory_dir / 'fac.py'}:make"
    missing = factory_dir / "missing.safetensors"
    assert _error(fac, str(missing)) == f"teacher weights {missing} not found"
    assert _error(fac, str(factory_dir)) == f"teacher weights {factory_dir} is not a file"
    pickle_like = factory_dir / "w.pt"
    pickle_like.write_bytes(b"\x80\x04not a safetensors file at all")
    msg = _error(fac, str(pickle_like))
    assert msg.startswith(f"teacher weights {pickle_like} is not a safetensors file (") and msg.endswith(")")
    prefix = f"teacher weights {factory_dir / 'w.safetensors'} do not match the module from {fac}: "
    no_offset = _weights(factory_dir, offset=None)
    assert _error(fac, str(no_offset)) == prefix + "1 missing, 0 unexpected, 0 mis-shaped (e.g. offset)"
    extra = _weights(factory_dir, extra=torch.zeros(2))
    assert _error(fac, str(extra)) == prefix + "0 missing, 1 unexpected, 0 mis-shaped (e.g. extra)"
    bad_shape = _weights(factory_dir, **{"lin.weight": torch.zeros(4, 3, dtype=torch.float64)})
    shape_msg = "0 missing, 0 unexpected, 1 mis-shaped (e.g. lin.weight: (4, 3) in the file, (4, 4) in the module)"
    assert _error(fac, str(bad_shape)) == prefix + shape_msg
