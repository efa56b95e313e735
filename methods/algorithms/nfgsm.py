"""N-FGSM, de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial
Training", NeurIPS 2022, arXiv:2202.01181; official code pdejorge/N-FGSM (train.py L216-248).

Per step (spec section 3.1): eta ~ U(-k eps, k eps) (k = 2), clamped so x + eta is an image; one
signed-gradient step of size alpha (= eps) from x + eta; the result is clamped to [0, 1] but NOT
projected onto the eps-ball (official ``clip=-1``), so ||delta||_inf can reach (k + 1) eps.
The official code attacks in train mode.

``eps_ramp_epochs`` (default 0 = off; 5 in the SVHN recipes) reproduces the official SVHN
warm-up (``train.py`` L149-156, L206-211; :mod:`.ramp`): the noise radius k eps and the step alpha
are both multiplied by ``global_step / (E * S)`` (capped at 1), so the first step uses eps = 0.
The eps in use is reported as ``ctx.stats["eps"]``.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import input_gradient
from ..registry import METHODS
from ..threat import clamp_to_image
from .base import Method, ModelMode, attack_mode
from .ramp import eps_ramp


@METHODS.register("nfgsm")
class NFGSM(Method):
    name = "nfgsm"
    paper = "de Jorge et al. Make Some Noise (N-FGSM). NeurIPS 2022, arXiv:2202.01181"

    def __init__(self, *, threat, k: float = 2.0, alpha_ratio: float = 1.0,
                 attack_mode: str = "train", eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(threat=threat)
        self.k = float(k)
        self.alpha_ratio = float(alpha_ratio)
        self.attack_mode = ModelMode(attack_mode)
        self.eps_ramp_epochs = float(eps_ramp_epochs)

    def loss(self, model, x, y, ctx):
        eps = self.threat.eps * eps_ramp(ctx, self.eps_ramp_epochs)
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            eta = clamp_to_image(x, self.threat.random_start(x, radius=self.k * eps,
                                                             generator=ctx.generator))
            grad = input_gradient(model, x, eta, y)
            delta = clamp_to_image(x, self.threat.ascent(eta, grad, self.alpha_ratio * eps))
        ctx.stats["eps"] = eps
        return F.cross_entropy(model(x + delta.detach()), y)
