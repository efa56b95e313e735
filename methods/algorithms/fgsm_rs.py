"""FGSM with random start (FGSM-RS), Wong, Rice & Kolter, "Fast is better than free",
ICLR 2020, arXiv:2001.03994; official code locuslab/fast_adversarial (CIFAR10/train_fgsm.py
L105-120).

Per step (spec section 3.2): delta ~ U(-eps, eps) clamped to the image; one signed-gradient step
of size alpha (official default 1.25 eps = 10/255 at 8/255); projection onto the eps-ball and
clamp to [0, 1]; train on CE at x + delta.  The attack runs in train mode in the official code.

``eps_ramp_epochs`` (default 0 = off) is N-FGSM's SVHN warm-up (:mod:`.ramp`).  locuslab has no
SVHN recipe; FGSM-RS on SVHN in the N-FGSM comparison is N-FGSM's ``train.py`` with ``--unif 1
--clip 1`` (its ``--clip`` help: "In Fast Adv Training it would be set to 1"), whose SVHN branch
ramps ``epsilon`` (the random-start radius), ``alpha`` and ``clip`` (the projection radius) by
the same factor (``train.py`` L149-156, L206-211).  So here the random start, the step
``alpha_ratio * eps`` and the projection all use the ramped eps, reported as
``ctx.stats["eps"]``.  With the ramp off every number is the unramped one, bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..attacks import input_gradient
from ..registry import METHODS
from ..threat import clamp_to_image
from .base import Method, ModelMode, attack_mode
from .ramp import eps_ramp


@METHODS.register("fgsm_rs")
class FGSMRS(Method):
    name = "fgsm_rs"
    paper = "Wong, Rice, Kolter. Fast is better than free. ICLR 2020, arXiv:2001.03994"

    def __init__(self, *, threat, alpha_ratio: float = 1.25, attack_mode: str = "train",
                 eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(threat=threat)
        self.alpha_ratio = float(alpha_ratio)
        self.attack_mode = ModelMode(attack_mode)
        self.eps_ramp_epochs = float(eps_ramp_epochs)

    def loss(self, model, x, y, ctx):
        eps = self.threat.eps * eps_ramp(ctx, self.eps_ramp_epochs)
        threat = dataclasses.replace(self.threat, eps=eps)   # random start and projection radius
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            delta = clamp_to_image(x, threat.random_start(x, generator=ctx.generator))
            grad = input_gradient(model, x, delta, y)
            delta = threat.ascent(delta, grad, self.alpha_ratio * eps)
            delta = clamp_to_image(x, threat.project(delta))
        ctx.stats["eps"] = eps
        return F.cross_entropy(model(x + delta.detach()), y)
