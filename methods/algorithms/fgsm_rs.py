"""FGSM with random start (FGSM-RS), Wong, Rice & Kolter, "Fast is better than free",
ICLR 2020, arXiv:2001.03994; official code locuslab/fast_adversarial (CIFAR10/train_fgsm.py).

Per step (spec section 3.2): delta ~ U(-eps, eps) clamped to the image; one signed-gradient step
of size alpha (official default 1.25 eps = 10/255 at 8/255); projection onto the eps-ball and
clamp to [0, 1]; train on CE at x + delta.  The attack runs in train mode in the official code.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import input_gradient
from ..registry import METHODS
from ..threat import clamp_to_image
from .base import Method, ModelMode, attack_mode


@METHODS.register("fgsm_rs")
class FGSMRS(Method):
    name = "fgsm_rs"
    paper = "Wong, Rice, Kolter. Fast is better than free. ICLR 2020, arXiv:2001.03994"

    def __init__(self, *, threat, alpha_ratio: float = 1.25, attack_mode: str = "train") -> None:
        super().__init__(threat=threat)
        self.alpha_ratio = float(alpha_ratio)
        self.attack_mode = ModelMode(attack_mode)

    def loss(self, model, x, y, ctx):
        eps = self.threat.eps
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            delta = clamp_to_image(x, self.threat.random_start(x, generator=ctx.generator))
            grad = input_gradient(model, x, delta, y)
            delta = self.threat.ascent(delta, grad, self.alpha_ratio * eps)
            delta = clamp_to_image(x, self.threat.project(delta))
        return F.cross_entropy(model(x + delta.detach()), y)
