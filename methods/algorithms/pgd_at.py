"""PGD-k adversarial training, Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, arXiv:1706.06083 (MadryLab mnist_challenge / cifar10_challenge
configs; locuslab train_pgd.py).

Per step (spec section 3.3): uniform random start in the eps-ball, ``steps`` signed-gradient
steps of size ``alpha`` with projection and image clamp after each, no per-example early stop;
train on CE at the final point.  Official defaults: MNIST 40 x 0.01 at eps 0.3; CIFAR 10 x 2/255
at 8/255.  ``alpha`` is absolute (in [0, 1] pixel units).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd
from ..registry import METHODS
from .base import Method, ModelMode, attack_mode


@METHODS.register("pgd_at")
class PGDAT(Method):
    name = "pgd_at"
    paper = "Madry et al. Towards Deep Learning Models Resistant to Adversarial Attacks. ICLR 2018"

    def __init__(self, *, threat, steps: int = 10, alpha: float = 2 / 255,
                 attack_mode: str = "train") -> None:
        super().__init__(threat=threat)
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.attack_mode = ModelMode(attack_mode)

    def loss(self, model, x, y, ctx):
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            x_adv = pgd(model, x, y, self.threat, alpha=self.alpha, steps=self.steps,
                        generator=ctx.generator)
        return F.cross_entropy(model(x_adv), y)
