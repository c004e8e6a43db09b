"""A class-conditional mixture of Gaussians whose TrigFlow velocity is exact, and a small MLP student.

Data x0 in R^d ([B, d] tensors). Class c is a mixture of diagonal Gaussians N(mu_k, diag(s_k^2)) with weights
w_k (summing to 1 over the class's components); the unconditional law (label -1, the null class of
classifier-free guidance) is the mixture over all components with weights pi_c w_k.

With x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), component k gives x_t ~ N(cos t mu_k, Sig_k(t)),
Sig_k(t) = cos^2 t s_k^2 + sin^2 t sigma_d^2 (elementwise), and jointly Gaussian (x0, z, x_t), so

    E[x0 | x_t, k] = mu_k + cos t s_k^2 (x_t - cos t mu_k) / Sig_k
    E[z  | x_t, k] = sin t sigma_d^2 (x_t - cos t mu_k) / Sig_k
    v_k = cos t E[z | .] - sin t E[x0 | .] = -sin t mu_k + sin t cos t (sigma_d^2 - s_k^2) (x_t - cos t mu_k) / Sig_k

and the PF-ODE velocity E[cos t z - sin t x0 | x_t] = sum_k p(k | x_t) v_k with the posterior responsibilities
p(k | x_t) proportional to (weight_k) N(x_t; cos t mu_k, Sig_k). The teacher returns F = velocity / sigma_d
(TrigFlow: dx_t/dt = sigma_d F, Eq. 3). Everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scm_graph.model import AdaptiveWeight


@dataclass(frozen=True)
class Component:
    label: int  # the class it belongs to
    weight: float  # its weight within the class
    mean: tuple[float, ...]
    std: tuple[float, ...]  # per-coordinate standard deviation (diagonal covariance)


class MoG:
    """The data law: classes, their weights pi_c, and their components."""

    def __init__(self, components: list[Component], class_weights: tuple[float, ...]):
        self.components, self.pi = components, torch.tensor(class_weights, dtype=torch.float64)
        self.K = len(class_weights)
        self.d = len(components[0].mean)
        self.mu = torch.tensor([c.mean for c in components], dtype=torch.float64)  # [M, d]
        self.s2 = torch.tensor([c.std for c in components], dtype=torch.float64).square()  # [M, d]
        self.label = torch.tensor([c.label for c in components])  # [M]
        self.w = torch.tensor([c.weight for c in components], dtype=torch.float64)  # [M] within-class weights
        for c in range(self.K):
            assert abs(self.w[self.label == c].sum().item() - 1) < 1e-12

    def log_weights(self, labels: Tensor | None) -> Tensor:
        """[B, M] log prior weights of the components given the label (-1 / None: the unconditional mixture)."""
        uncond = (self.pi[self.label] * self.w).log()  # pi_c w_k
        cond = self.w.log()
        if labels is None:
            return uncond[None]
        mine = labels[:, None] == self.label[None, :]
        return torch.where((labels < 0)[:, None], uncond[None], torch.where(mine, cond[None], -math.inf))

    def sample(self, n: int, gen: torch.Generator, labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x0 [n, d] float64, class labels [n], component indices [n]); labels drawn from pi unless given."""
        if labels is None:
            labels = torch.multinomial(self.pi, n, replacement=True, generator=gen)
        probs = self.log_weights(labels).exp()
        comp = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        x0 = self.mu[comp] + self.s2[comp].sqrt() * torch.randn(n, self.d, generator=gen, dtype=torch.float64)
        return x0, labels, comp

    def log_density(self, x_t: Tensor, t: Tensor, sigma_d: float, labels: Tensor | None) -> Tensor:
        """log p_t(x_t | label) (float64), the law of x_t = cos t x0 + sin t z."""
        logp = self._component_logp(x_t.double(), t.double(), sigma_d) + self.log_weights(labels)
        return torch.logsumexp(logp, dim=1)

    def _component_logp(self, x: Tensor, t: Tensor, sigma_d: float) -> Tensor:
        c, s = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
        var = c**2 * self.s2[None] + s**2 * sigma_d**2  # [B, M, d]
        r = x[:, None, :] - c * self.mu[None]
        return -0.5 * (torch.log(2 * math.pi * var) + r**2 / var).sum(2)  # [B, M]

    def velocity(self, x_t: Tensor, t: Tensor, sigma_d: float, labels: Tensor | None) -> Tensor:
        """E[cos t z - sin t x0 | x_t, label] (float64, [B, d])."""
        x, t = x_t.double(), t.double()
        resp = torch.softmax(self._component_logp(x, t, sigma_d) + self.log_weights(labels), dim=1)  # p(k | x_t)
        c, s = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
        var = c**2 * self.s2[None] + s**2 * sigma_d**2
        v = -s * self.mu[None] + s * c * (sigma_d**2 - self.s2[None]) * (x[:, None, :] - c * self.mu[None]) / var  # v_k
        return (resp[:, :, None] * v).sum(1)


class MoGTeacher(nn.Module):
    """The exact TrigFlow diffusion model of `mog`: teacher(x_t, t, labels) = F = E[v_t | x_t] / sigma_d, in x_t's dtype."""

    def __init__(self, mog: MoG, sigma_d: float):
        super().__init__()
        self.mog, self.sigma_d = mog, float(sigma_d)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, dropout_key: Tensor | None = None) -> Tensor:
        return (self.mog.velocity(x_t, t, self.sigma_d, labels) / self.sigma_d).to(x_t.dtype)


def guided_velocity(mog: MoG, x: Tensor, t: Tensor, sigma_d: float, labels: Tensor, s: float) -> Tensor:
    """The CFG PF-ODE velocity sigma_d (F_u + s (F_c - F_u)) = v_u + s (v_c - v_u), float64."""
    v_c = mog.velocity(x, t, sigma_d, labels)
    v_u = mog.velocity(x, t, sigma_d, torch.full_like(labels, -1))
    return v_u + s * (v_c - v_u)


def integrate_guided_ode(mog: MoG, x: Tensor, t0: float, t1: float, sigma_d: float, labels: Tensor, s: float,
                         steps: int) -> Tensor:
    """RK4 on dx/dt = v_u + s (v_c - v_u) from t0 to t1 with `steps` equal steps (float64)."""
    x = x.double()
    h = (t1 - t0) / steps
    B = x.shape[0]
    for i in range(steps):
        t = t0 + i * h
        tt = lambda a: torch.full((B,), a, dtype=torch.float64)
        k1 = guided_velocity(mog, x, tt(t), sigma_d, labels, s)
        k2 = guided_velocity(mog, x + 0.5 * h * k1, tt(t + 0.5 * h), sigma_d, labels, s)
        k3 = guided_velocity(mog, x + 0.5 * h * k2, tt(t + 0.5 * h), sigma_d, labels, s)
        k4 = guided_velocity(mog, x + h * k3, tt(t + h), sigma_d, labels, s)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class MLPStudent(nn.Module):
    """A small guidance-conditional MLP with the TrigFlow interface: model(x_t, t, labels, dropout_key, guidance)
    = F_theta(x_t / sigma_d, t, label, s). Input features: [x_t / sigma_d, sin/cos(k t) for k = 1..4, t,
    one-hot label, s - 1.5]; SiLU hidden layers; `w_phi` the package's AdaptiveWeight."""

    takes_guidance = True

    def __init__(self, d: int, num_classes: int, sigma_d: float, width: int = 128, depth: int = 3):
        super().__init__()
        self.d, self.num_classes, self.sigma_d = d, num_classes, float(sigma_d)
        n_in = d + 9 + num_classes + 1
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(n_in if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, d))
        self.net = nn.Sequential(*layers)
        self.w_phi = AdaptiveWeight(32)
        self.register_buffer("freqs", torch.arange(1.0, 5.0), persistent=False)
        self.register_buffer("classes", torch.arange(num_classes), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, dropout_key: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        t = t.to(x_t.dtype)[:, None]
        tk = t * self.freqs.to(x_t.dtype)
        onehot = (labels[:, None] == self.classes).to(x_t.dtype)
        s = (guidance if guidance is not None else torch.ones_like(t[:, 0])).to(x_t.dtype)[:, None] - 1.5
        feats = torch.cat([x_t / self.sigma_d, torch.sin(tk), torch.cos(tk), t, onehot, s], dim=1)
        return self.net(feats)
