"""Threat-model geometry shared by every attack (FGSM, N-FGSM, PGD, BB, Selective AT).

Inputs live in pixel space [0, 1]; a perturbation ``delta`` is added to ``x``.  Each threat model
knows three things, following MadryLab's ``robustness`` attack steps:

* ``random_start(x, radius)``: a uniform draw from the ball of the given radius (default eps);
* ``ascent(delta, grad, alpha)``: one steepest-ascent step of size ``alpha`` in its norm;
* ``project(delta)``: the Euclidean projection onto its eps-ball.

``clamp_to_image`` keeps ``x + delta`` inside [0, 1]; it is separate because N-FGSM clamps to the
image range but deliberately does not project onto the eps-ball.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Norm(str, enum.Enum):
    LINF = "linf"
    L2 = "l2"



def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if not isinstance(self.norm, Norm):
            object.__setattr__(self, "norm", Norm(self.norm))
        if not self.eps >= 0:
            raise ValueError(f"threat model eps must be >= 0, got {self.eps!r}")

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example size of ``delta`` in this norm, shape (B,)."""
        flat = delta.flatten(1)
        if self.norm is Norm.LINF:
            return flat.abs().amax(dim=1)
        return flat.norm(p=2, dim=1)

    def random_start(self, x: torch.Tensor, radius: float | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform sample from the ball of ``radius`` (default eps) around 0, shaped like x."""
        r = self.eps if radius is None else radius
        if self.norm is Norm.LINF:
            u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            return (2 * u - 1) * r
        # Uniform in the L2 ball: Gaussian direction, radius ~ r * U^(1/d).
        g = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        d = g[0].numel()
        direction = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), g)
        u = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device, x.dtype)
        return direction * _view(r * u.pow(1.0 / d), g)

    def ascent(self, delta: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        """One steepest-ascent step of size ``alpha`` (sign step for Linf, normalised for L2)."""
        if self.norm is Norm.LINF:
            return delta + alpha * grad.sign()
        g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta + alpha * grad / _view(g_norm, grad)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Projection of ``delta`` onto the eps-ball of this norm."""
        if self.norm is Norm.LINF:
            return delta.clamp(-self.eps, self.eps)
        n = delta.flatten(1).norm(dim=1)
        factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-12), torch.ones_like(n))
        return delta * _view(factor, delta)


def clamp_to_image(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Return the part of ``delta`` that keeps ``x + delta`` inside [0, 1]."""
    return (x + delta).clamp(0.0, 1.0) - x
