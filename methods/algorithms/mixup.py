"""mixup: Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018,
arXiv:1710.09412; official code facebookresearch/mixup-cifar10 @eaff31ab ``train.py`` (spec 2.1).

Per step, as coded (``train.py`` L119-138, L152-157): one lambda ~ Beta(alpha, alpha) for the
batch, one permutation, ``x_mix = lam x + (1 - lam) x[perm]``, and the loss
``lam CE(out, y) + (1 - lam) CE(out, y[perm])`` on ``out = model(x_mix)``.  alpha 1 (the code's
default); ``alpha: 0`` trains on the clean batch (the code's ``lam = 1``).  The images are mixed
in [0, 1] pixel space before the model's own normalisation, which equals the code's mixing of
normalised tensors because normalisation is affine per channel.

Options (``method_args``), each runnable:

* ``variant``: ``batch`` (above, default) or ``per_sample``, the Mixup-Inference repo's mixup
  (P2333/Mixup-Inference @6d164cba ``train_resnet_mixup.py`` L184-210, spec 2.4): two
  independent permutations and one lambda per example, ``lam_i x[pi1_i] + (1 - lam_i) x[pi2_i]``.
* ``criterion`` (the loss; named as the codes name it, ``loss`` being the method's hook):
  ``ce`` (the two-label form above, default), ``soft_ce`` (cross-entropy against the
  mixed one-hot target: the Mixup-Inference repo's ``soft_cross_entropy``; equal to ``ce`` up to
  rounding) or ``bce_softmax`` (manifold_mixup's loss).  See :mod:`.mixing`.

Recipe-level departures (named in ``workflow/config/papers/mixup.yaml``): the code keeps the
checkpoint with the best *test* accuracy; here the final epoch (``last``) and the best epoch on
the validation monitor (``best``) are reported.
"""
from __future__ import annotations

from ..registry import METHODS
from .base import Method
from .mixing import (LOSSES, check_alpha, check_loss, check_variant, draw_mix, mix_inputs,
                     mix_targets)


@METHODS.register("mixup")
class Mixup(Method):
    name = "mixup"
    paper = ("Zhang et al. mixup: Beyond Empirical Risk Minimization. ICLR 2018 "
             "(facebookresearch/mixup-cifar10)")

    def __init__(self, *, threat, alpha: float = 1.0, variant: str = "batch",
                 criterion: str = "ce") -> None:
        super().__init__(threat=threat)
        self.alpha = check_alpha(alpha)
        self.variant = check_variant(variant)
        self.criterion = check_loss(criterion)

    def loss(self, model, x, y, ctx):
        mix = draw_mix(len(y), self.alpha, self.variant, ctx.generator, x.device)
        logits = model(mix_inputs(mix, x))
        ctx.stats["lambda"] = 1.0 if mix is None else mix.mean_lambda()
        return LOSSES[self.criterion](logits, mix_targets(mix, y, logits.shape[1]))
