"""The sCD objective (float64): the teacher's guided velocity, the tangent along the teacher's PF-ODE by
finite differences, a frozen teacher, and sCD = sCT's Algorithm 1 with only dx_t/dt changed."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call

from scm_graph import trigflow
from scm_graph.model import build_model
from scm_graph.objectives.scd import scd_loss, teacher_velocity
from scm_graph.objectives.sct import consistency_loss, tangent
from scm_graph.spec import ObjectiveSpec
from tests.helpers import tiny_spec
from tests.objectives.shared import SD, _grads, _inputs


class LabelledTeacher(nn.Module):
    """F = x_t + c[label] (c_u for the null class -1): a teacher whose conditional and unconditional F differ."""

    def __init__(self, c: torch.Tensor, c_u: torch.Tensor, sigma_d: float = SD):
        super().__init__()
        self.c, self.c_u, self.sigma_d, self.calls = c, c_u, sigma_d, 0

    def forward(self, x_t, t, labels=None, dropout_key=None):
        self.calls += 1
        if labels is None:
            return x_t + self.c_u
        return x_t + torch.where((labels >= 0).reshape(-1, 1, 1, 1), self.c[labels.clamp(min=0)], self.c_u)


def _models(seed: int = 0):
    """(guidance-distilled student, class-conditional diffusion teacher): tiny U-Nets in float64, different weights."""
    student_spec = dataclasses.replace(tiny_spec(class_conditional=True), objective=ObjectiveSpec(kind="scd", teacher="t"))
    teacher_spec = dataclasses.replace(tiny_spec(class_conditional=True), objective=ObjectiveSpec(kind="diffusion"))
    torch.manual_seed(seed)
    student, teacher = build_model(student_spec).double(), build_model(teacher_spec).double().eval()
    with torch.no_grad():
        for m in (student, teacher):
            m.net.conv_out.weight.normal_(0, 0.1)
        student.w_phi.linear.weight.normal_(0, 0.1)
        student.net.emb.guidance.weight.normal_(0, 0.1)  # so that s visibly enters the student
    for p in teacher.parameters():
        p.requires_grad_(False)
    assert student.takes_guidance and not teacher.takes_guidance
    return student, teacher


def _guided(inp, s=(1.0, 1.5, 2.0)):
    return dataclasses.replace(inp, guidance=torch.tensor(s, dtype=torch.float64))


def test_teacher_velocity_is_the_cfg_velocity_in_one_call():
    g = torch.Generator().manual_seed(0)
    c, c_u = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    teacher = LabelledTeacher(c, c_u)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t, labels, s = torch.tensor([0.3, 0.9, 1.35], dtype=torch.float64), torch.tensor([2, 0, 3]), torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    v = teacher_velocity(teacher, x, t, labels, s)
    F_c, F_u = x + c[labels], x + c_u
    want = SD * (F_u + s.reshape(-1, 1, 1, 1) * (F_c - F_u))  # dx_t/dt = sigma_d (F_u + s (F_c - F_u))
    torch.testing.assert_close(v, want, rtol=0, atol=1e-15)
    assert teacher.calls == 1
    torch.testing.assert_close(teacher_velocity(teacher, x, t, labels, None), SD * F_c, rtol=0, atol=0)  # no guidance
    torch.testing.assert_close(teacher_velocity(teacher, x, t, None, None), SD * F_u, rtol=0, atol=0)  # unconditional


def test_scd_tangent_is_cos_t_times_df_dt_along_the_teachers_guided_pf_ode():
    """g (r = 1) equals cos t d/dt f^-(x(t), t) where x(t) follows the teacher's guided PF-ODE through x_t, with
    the student's guidance input s held fixed (central differences in float64)."""
    student, teacher = _models()
    params = dict(student.named_parameters())
    inp = _guided(_inputs())
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    v = teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)
    _, g = tangent(student, params, inp, x_t, v, ObjectiveSpec(kind="scd"))

    def f(x, t):
        return trigflow.consistency_fn(x, t, functional_call(student, params, (x, t, inp.labels, inp.dropout_key, inp.guidance)), SD)

    h = 1e-5
    df_dt = (f(x_t + h * v, inp.t + h) - f(x_t - h * v, inp.t - h)) / (2 * h)  # along dx/dt = v at x_t
    torch.testing.assert_close(g, trigflow.expand(torch.cos(inp.t), g) * df_dt, rtol=1e-6, atol=1e-9)
    # the guidance input matters: another s gives another tangent
    _, g2 = tangent(student, params, _guided(inp, (2.0, 1.0, 1.5)), x_t, v, ObjectiveSpec(kind="scd"))
    assert not torch.allclose(g, g2)


def test_scd_is_consistency_loss_with_the_teachers_velocity():
    """Same value and gradient as Algorithm 1 fed the teacher's velocity by hand; none of it reaches the teacher."""
    student, teacher = _models()
    params = dict(student.named_parameters())
    inp = _guided(_inputs())
    cfg = ObjectiveSpec(kind="scd")
    out = scd_loss(student, params, inp, cfg, teacher=teacher)
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    v = teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)
    ref = consistency_loss(student, params, inp, cfg, lambda x, i: v)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(_grads(student, out.loss), _grads(student, ref.loss), rtol=0, atol=0)
    assert all(p.grad is None for p in teacher.parameters())
    # not sCT: the data's one-sample velocity gives another loss
    sct = consistency_loss(student, params, inp, cfg, lambda x, i: trigflow.velocity(i.x0, i.z, i.t))
    assert not torch.allclose(out.loss, sct.loss)


@pytest.mark.parametrize("flip", ["sign", "sigma_d"])
def test_a_wrong_teacher_velocity_breaks_the_tangent(flip: str):
    """The finite-difference identity fails for -v or for v without sigma_d: the test above can fail."""
    student, teacher = _models()
    params = dict(student.named_parameters())
    inp = _guided(_inputs())
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    v = teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)
    wrong = -v if flip == "sign" else v / SD
    _, g = tangent(student, params, inp, x_t, wrong, ObjectiveSpec(kind="scd"))

    def f(x, t):
        return trigflow.consistency_fn(x, t, functional_call(student, params, (x, t, inp.labels, inp.dropout_key, inp.guidance)), SD)

    h = 1e-5
    df_dt = (f(x_t + h * v, inp.t + h) - f(x_t - h * v, inp.t - h)) / (2 * h)
    assert not torch.allclose(g, trigflow.expand(torch.cos(inp.t), g) * df_dt, rtol=1e-3, atol=1e-6)


def test_scd_gradient_is_the_continuous_limit_of_discrete_cd():
    """grad L_sCD = lim_{dt->0} grad of discrete consistency distillation: (1/2dt) ||f_theta(x_t, t) -
    f_theta^-(x_t - dt v, t - dt)||^2 with one Euler step of the teacher's guided PF-ODE (v its velocity), weighted
    2 / (D sigma_d tan t (||g|| + c)) per sample as in the sCT test."""
    student, teacher = _models()
    params = dict(student.named_parameters())
    cfg = ObjectiveSpec(kind="scd", sigma_d=SD, adaptive_weighting=False, tangent_c=0.1)
    inp = _guided(_inputs())
    out = scd_loss(student, params, inp, cfg, teacher=teacher)
    g_scd = _grads(student, out.loss)
    D = inp.x0[0].numel()
    K = 2.0 / (D * SD * torch.tan(inp.t) * (out.tangent_norm + cfg.tangent_c))
    x_t = trigflow.noisy(inp.x0, inp.z, inp.t)
    v = teacher_velocity(teacher, x_t, inp.t, inp.labels, inp.guidance)

    def f(p, x, t, detach):
        pp = {k: w.detach() for k, w in p.items()} if detach else p
        return trigflow.consistency_fn(x, t, functional_call(student, pp, (x, t, inp.labels, inp.dropout_key, inp.guidance)), SD)

    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        diff = f(params, x_t, inp.t, False) - f(params, x_t - dt * v, inp.t - dt, True)
        L_disc = (K / (2 * dt) * diff.square().flatten(1).sum(1)).mean()
        errs.append(((_grads(student, L_disc) - g_scd).norm() / g_scd.norm()).item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-3, errs
