"""PGD-k adversarial training, Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, arXiv:1706.06083 (MadryLab mnist_challenge / cifar10_challenge
configs; locuslab train_pgd.py).

Per step (spec section 3.3): uniform random start in the eps-ball, ``steps`` signed-gradient
steps of size ``alpha`` with projection and image clamp after each, no per-example early stop;
train on CE at the final point.  Official defaults: MNIST 40 x 0.01 at eps 0.3; CIFAR 10 x 2/255
at 8/255.  ``alpha`` is absolute (in [0, 1] pixel units).

``eps_ramp_epochs`` (default 0 = off) is the SVHN eps warm-up of :mod:`.ramp`, for PGD baselines
trained under N-FGSM's SVHN protocol.  N-FGSM's ``train.py`` has no PGD training, and neither
MadryLab nor locuslab has an SVHN recipe (spec section 3.3).  The official code that does train
PGD on SVHN with these settings (lr 0.05, cyclic peak at 2/5, 5-epoch ramp; N-FGSM's SVHN branch
has the same three, so we infer it follows this code) is GradAlign's ``train.py``
(tml-epfl/understanding-fast-adv-training @ceed494, L130-136; outside the spec): it ramps eps
only, ``eps_pgd_train = min(iteration / n_iterations_max_eps * eps, eps)``, and keeps the step
``pgd_alpha_train`` fixed.  So here the random start and the projection use the ramped eps
(reported as ``ctx.stats["eps"]``) and ``alpha`` is not scaled.  With the ramp off every number
is the unramped one, bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..attacks import pgd
from ..registry import METHODS
from .base import Method, ModelMode, attack_mode
from .ramp import eps_ramp


@METHODS.register("pgd_at")
class PGDAT(Method):
    name = "pgd_at"
    paper = "Madry et al. Towards Deep Learning Models Resistant to Adversarial Attacks. ICLR 2018"

    def __init__(self, *, threat, steps: int = 10, alpha: float = 2 / 255,
                 attack_mode: str = "train", eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(threat=threat)
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.attack_mode = ModelMode(attack_mode)
        self.eps_ramp_epochs = float(eps_ramp_epochs)

    def loss(self, model, x, y, ctx):
        eps = self.threat.eps * eps_ramp(ctx, self.eps_ramp_epochs)
        threat = dataclasses.replace(self.threat, eps=eps)
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            x_adv = pgd(model, x, y, threat, alpha=self.alpha, steps=self.steps,
                        generator=ctx.generator)
        ctx.stats["eps"] = eps
        return F.cross_entropy(model(x_adv), y)
