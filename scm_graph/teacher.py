"""Teachers for sCD: an EDM-family denoiser seen as a TrigFlow model, and the hook that loads one.

sCD (sCM Sec. 5) distils a frozen diffusion *teacher*: the tangent uses the teacher's PF-ODE velocity
`dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t)` instead of sCT's one-sample estimate. Objectives call a
teacher exactly like the student, `teacher(x_t, t, labels, dropout_key) -> F` (the `TrigFlowModel`
interface), so they never need to know how it was parameterised.

Spec fields (the `objective` section):

    objective.teacher          path of the teacher's weights (.safetensors)
    objective.teacher_kind     'trigflow': an scm_graph checkpoint (a TrigFlowModel, e.g. a diffusion run)
                               'edm':      an EDM-family denoiser D(x_edm, sigma, labels), built by
                                           objective.teacher_factory and wrapped in `EDMVelocity`
    objective.teacher_factory  "path/to/file.py:function_name" (teacher_kind 'edm' only; 'trigflow' needs none)

Plugging in an EDM / EDM2 denoiser. Write a Python file with a function that takes no arguments and
returns the denoiser as a `torch.nn.Module` whose `forward(x, sigma, class_labels)` is EDM's
x0-prediction `D(x, sigma)` for `x = x0 + sigma n` (n unit Gaussian; `sigma` a [B] tensor). A *raw*
EDM-family network `F_edm(c_in x, c_noise, class_labels)` becomes such a denoiser with `EDMPrecond`:

    # my_teacher.py -- objective.teacher_factory: "my_teacher.py:make"
    import torch
    from scm_graph.teacher import EDMPrecond, one_hot_labels
    from training.networks_edm2 import UNet  # found: the file's folder is on sys.path while it loads

    class Net(torch.nn.Module):  # our labels are class indices (-1 = unconditional); EDM2 wants one-hot
        def __init__(self):
            super().__init__()
            self.unet = UNet(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192)
        def forward(self, x, c_noise, labels):
            return self.unet(x, c_noise, one_hot_labels(labels, 1000))

    def make():
        return EDMPrecond(Net(), sigma_d=0.5)

`objective.teacher` then holds that module's `state_dict()` as safetensors (`safetensors.torch.save_file`,
names as the module has them, here `net.unet....`); a pickle is never read. `load_denoiser` builds the
module, loads the weights with `strict=True`, and returns it in eval mode with every parameter frozen;
every problem is a one-line `UserError` naming the file. With no weights file the factory's own
weights are kept.

Units. The conversion below is exact for any `sigma_d`, but the teacher must have been trained on the
data in the units `data.normalize` gives the student ('pixel': [-1, 1], EDM's pixel models with
sigma_data 0.5; 'channel': per-channel std sigma_d, e.g. EDM2's latents at 0.5), and `objective.sigma_d`
must be the data std the time proposal assumes.

The conversion (sCM Sec. 3, docs/design.md section 1): `sigma = sigma_d tan t`, `x_edm = x_t / cos t`,

    sigma_d F(x_t / sigma_d, t) = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / sin t,   0 < t < pi/2

and its inverse `D(x_edm, sigma) = cos t x_t - sin t sigma_d F` with `t = arctan(sigma / sigma_d)`
(`TrigFlowAsEDM`, for evaluating our models with EDM samplers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from scm_graph import trigflow
from scm_graph.errors import UserError, first_line
from scm_graph.nets.embedding import class_one_hot


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """A [B] or scalar time / noise level (EDM samplers pass a scalar) -> [B]; a float tensor keeps its dtype."""
    if not (isinstance(v, Tensor) and v.is_floating_point()):
        v = torch.as_tensor(v, dtype=x.dtype)
    return v.to(x.device).reshape(-1).expand(x.shape[0])


def one_hot_labels(labels: Tensor | None, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Class indices [B] (-1 = the null class of CFG) -> EDM-style one-hot [B, num_classes] (zeros for -1)."""
    if labels is None:
        return None
    return class_one_hot(labels.long(), num_classes).to(dtype)


class EDMVelocity(nn.Module):
    """An EDM denoiser `D(x_edm, sigma, class_labels)` seen as a TrigFlow model: `forward(x_t, t) -> F`.

    Same call as `TrigFlowModel`: `forward(x_t, t, labels, dropout_key)` returns F with
    `sigma_d F = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / sin t`; `t` is [B] with 0 < t < pi/2
    (t = 0 divides by sin t = 0; t = pi/2 by cos t = 0; the sampler's t_max = arctan(80 / sigma_d) is fine).
    Labels pass through unchanged; `dropout_key` is ignored (a teacher runs in eval mode).
    """

    def __init__(self, denoiser: nn.Module, sigma_d: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_d = float(sigma_d)

    def forward(
        self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, dropout_key: Tensor | None = None
    ) -> Tensor:
        t = _per_sample(t, x_t)
        sigma = trigflow.edm_sigma(t, self.sigma_d)  # sigma = sigma_d tan t
        D = self.denoiser(trigflow.trig_to_edm_x(x_t, t), sigma, labels)  # D(x_t / cos t, sigma)
        return trigflow.F_from_edm_denoiser(x_t, t, D, self.sigma_d)  # F = (cos t x_t - D) / (sigma_d sin t)


class EDMPrecond(nn.Module):
    """EDM / EDM2 preconditioning around a raw network `net(x_in, c_noise, class_labels)`: a denoiser.

    `D(x, sigma, labels) = c_skip x + c_out net(c_in x, c_noise, labels)` with
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_noise = log(sigma) / 4 (a [B] tensor). `sigma` is [B] (or a
    scalar, as EDM's samplers pass), sigma > 0. Labels pass through unchanged (None allowed).
    With the same sigma_d, `EDMVelocity(EDMPrecond(net, sigma_d), sigma_d)` is F = -net(x_t / sigma_d, c_noise).
    """

    def __init__(self, net: nn.Module, sigma_d: float):
        super().__init__()
        self.net = net
        self.sigma_d = float(sigma_d)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        sigma = _per_sample(sigma, x)
        s, sd = trigflow.expand(sigma, x), self.sigma_d
        c_skip = sd**2 / (s**2 + sd**2)  # sigma_d^2 / (sigma^2 + sigma_d^2)
        c_out = s * sd / (s**2 + sd**2).sqrt()  # sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
        c_in = 1 / (s**2 + sd**2).sqrt()  # 1 / sqrt(sigma^2 + sigma_d^2)
        c_noise = sigma.log() / 4  # log(sigma) / 4, [B]
        return c_skip * x + c_out * self.net(c_in * x, c_noise, class_labels)


class TrigFlowAsEDM(nn.Module):
    """A TrigFlow model (`model(x_t, t, labels, dropout_key) -> F`, with `model.sigma_d`) as an EDM denoiser.

    `D(x_edm, sigma, labels) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t)` with t = arctan(sigma / sigma_d)
    and x_t = cos t x_edm; 0 <= sigma < inf. `sigma` is [B] or a scalar. The inverse of `EDMVelocity`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sigma_d = float(model.sigma_d)

    def forward(self, x_edm: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        t = trigflow.trig_t(_per_sample(sigma, x_edm), self.sigma_d)  # t = arctan(sigma / sigma_d)
        x_t = trigflow.edm_to_trig_x(x_edm, t)  # x_t = cos t x_edm
        F = self.model(x_t, t, class_labels)
        return trigflow.edm_denoiser_from_F(x_t, t, F, self.sigma_d)  # D = cos t x_t - sin t sigma_d F


# --- the user hook ---------------------------------------------------------------------------------


def _describe(e: BaseException) -> str:
    """`TypeError: first line of the message`, one line."""
    name, msg = type(e).__name__, first_line(e)  # the type's name alone when the message is empty
    return name if msg == name else f"{name}: {msg}"


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path for the duration, so a factory file can import its neighbours."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def load_denoiser(factory: str, weights: str | Path | None = None) -> nn.Module:
    """Build the user's denoiser from `factory` ("path/to/file.py:function_name", a function of no
    arguments returning an nn.Module) and load `weights` (a .safetensors state dict, strict) into it.

    Returns the module in eval mode with requires_grad False on every parameter, on the CPU unless the
    factory put it elsewhere. Every failure is a one-line UserError naming the file and the problem.
    """
    file_part, sep, fn_name = str(factory).rpartition(":")
    if not sep or not file_part or not fn_name:
        raise UserError(f"teacher factory {factory!r} must look like 'path/to/file.py:function_name'")
    path = Path(file_part)
    if not path.exists():
        raise UserError(f"teacher factory {path} not found")
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"teacher factory {path} is not a .py file")
    wpath = None if weights is None else Path(weights)
    if wpath is not None and not wpath.exists():
        raise UserError(f"teacher weights {wpath} not found")
    if wpath is not None and not wpath.is_file():
        raise UserError(f"teacher weights {wpath} is not a file")

    name = f"_scm_graph_teacher_factory_{abs(hash(str(path.resolve())))}"  # registered: dataclasses need it
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"teacher factory {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _on_sys_path(path.resolve().parent):
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise UserError(f"teacher factory {path} cannot be imported ({_describe(e)})") from None
        fn = getattr(module, fn_name, None)
        if fn is None:
            raise UserError(f"teacher factory {path} has no function {fn_name!r}")
        if not callable(fn):
            raise UserError(f"teacher factory {path}: {fn_name!r} is not a function")
        try:
            denoiser = fn()
        except Exception as e:
            raise UserError(f"teacher factory {path}:{fn_name} failed ({_describe(e)})") from None
    if not isinstance(denoiser, nn.Module):
        raise UserError(f"teacher factory {path}:{fn_name} returned {type(denoiser).__name__}, not a torch.nn.Module")

    if wpath is not None:
        _load_weights(denoiser, wpath, f"{path}:{fn_name}")
    denoiser.eval()
    denoiser.requires_grad_(False)
    return denoiser


def _load_weights(module: nn.Module, path: Path, source: str) -> None:
    """safetensors -> `module.load_state_dict(strict=True)`; a mismatch is one line with counts and examples."""
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"teacher weights {path} is not a safetensors file ({_describe(e)})") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the module" for k in bad[:1]]
        e_g = [*missing[:1], *unexpected[:1], *shapes]
        raise UserError(
            f"teacher weights {path} do not match the module from {source}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(bad)} mis-shaped (e.g. {', '.join(e_g)})"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:  # e.g. a dtype the module cannot take
        why = _describe(e)
        raise UserError(f"teacher weights {path} cannot be loaded into the module from {source} ({why})") from None
