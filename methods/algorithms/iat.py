"""Interpolated Adversarial Training: Lamb, Verma, Kawaguchi, Matyasko, Khosla, Kannala, Bengio,
"Interpolated Adversarial Training: Achieving Robust Neural Networks without Sacrificing Too Much
Accuracy", AISec 2019 / Neural Networks 2022, arXiv:1906.06784 (spec 2.3).

No official IAT code was found; the step follows the paper's description (abstract; summaries) and
the IAT trainer of P2333/Mixup-Inference @6d164cba ``train_resnet_mixup.py`` L224-268 (its
``-adv_ratio 0.5``):

1. PGD on the **unmixed** clean batch, the model in eval mode (``classifier.eval()`` L231; option
   ``attack_mode``): uniform random start, ``steps`` sign steps of ``alpha`` with projection and
   clamp (:func:`methods.attacks.pgd`).  Defaults eps 8/255 (the threat), step 2/255 and **7**
   steps with random start, the spec's recommended default (section 6, the "Madry settings" of the
   ndb796 reimplementation); the Mixup-Inference repo's IAT uses **10** (``pgd_kwargs`` L173-181:
   16/255 and 4/255 in its [-1, 1] units), so ``steps`` is an argument.
2. A mixup loss on each half with its own, independent draws: ``(1 - adv_ratio) L(clean) +
   adv_ratio L(adv)``, 0.5 each (``adv_ratio``).

Options (``method_args``), each runnable:

* ``mixing``: ``input`` (mixup of the images, default) or ``manifold`` (Manifold Mixup: each half
  draws its own stage among ``stages``, default ``["input", "stage1", "stage2"]``, and mixes there
  through a forward hook, :mod:`.manifold_mixup`).
* ``mixup_alpha``: Beta(alpha, alpha) of the mixing (1, as the Mixup-Inference repo's
  ``-mixup_alpha 1.``; the IAT paper's own value was not read); 0 trains on the unmixed halves.
* ``variant``: ``batch`` (one lambda and one permutation per half, spec 2.1) or ``per_sample``
  (the Mixup-Inference repo's ``shuffle_minibatch``: two permutations, a lambda per example).
* ``criterion``: ``ce`` (mixup-cifar10's two-label loss, default), ``soft_ce`` (the
  Mixup-Inference repo's soft-label CE) or ``bce_softmax`` (manifold_mixup's).
* ``attack_labels``: ``labels`` (PGD against the true labels, default) or ``predicted`` (against the
  eval-mode model's predictions on the clean batch: the Mixup-Inference repo calls its cleverhans
  PGD with ``y=None``, ``MI/pgd.py`` L112-114, one extra forward booked to the attack).
* ``forward``: ``separate`` (one forward per half, as the spec's step is written, default) or
  ``joint`` (both mixed halves concatenated into one train-mode forward, so BatchNorm normalises
  over 2B rows: the Mixup-Inference repo, L245-264).
"""
from __future__ import annotations

import enum
from typing import Sequence

import torch

from ..attacks import pgd
from ..registry import METHODS
from .base import Method, ModelMode, attack_mode
from .mixing import (LOSSES, StageMix, check_alpha, check_loss, check_model_stages, check_stages,
                     check_variant, draw_mix, draw_stage, mix_inputs, mix_targets, mixed_at)


class Mixing(str, enum.Enum):
    INPUT = "input"
    MANIFOLD = "manifold"


class AttackLabels(str, enum.Enum):
    LABELS = "labels"
    PREDICTED = "predicted"


class Forward(str, enum.Enum):
    SEPARATE = "separate"
    JOINT = "joint"


def _choice(enum_cls, value, field):
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"method_args.{field}: unknown value {value!r}; known: "
                         f"{[v.value for v in enum_cls]}") from None


def _attack_labels_true(model, x, y):
    return y


def _attack_labels_predicted(model, x, y):
    with torch.no_grad():
        return model(x).argmax(dim=1)


#: ``attack_labels`` -> ``(model, x, y) -> labels the PGD ascends against``.
ATTACK_LABELS = {AttackLabels.LABELS: _attack_labels_true,
                 AttackLabels.PREDICTED: _attack_labels_predicted}


@METHODS.register("iat")
class InterpolatedAT(Method):
    name = "iat"
    paper = ("Lamb et al. Interpolated Adversarial Training. AISec 2019 (arXiv:1906.06784); "
             "trainer as in P2333/Mixup-Inference")

    def __init__(self, *, threat, steps: int = 7, alpha: float = 2 / 255,
                 attack_mode: str = "eval", attack_labels: str = "labels", mixing: str = "input",
                 mixup_alpha: float = 1.0, variant: str = "batch",
                 stages: Sequence[str] = ("input", "stage1", "stage2"), criterion: str = "ce",
                 forward: str = "separate", adv_ratio: float = 0.5) -> None:
        super().__init__(threat=threat)
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"method_args.steps must be an int >= 0; got {steps!r}")
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.attack_mode = _choice(ModelMode, attack_mode, "attack_mode")
        self.attack_labels = _choice(AttackLabels, attack_labels, "attack_labels")
        self.mixing = _choice(Mixing, mixing, "mixing")
        self.mixup_alpha = check_alpha(mixup_alpha, "mixup_alpha")
        self.variant = check_variant(variant)
        self.stages = check_stages(stages)
        self.criterion = check_loss(criterion)
        self.forward = _choice(Forward, forward, "forward")
        if not 0.0 <= float(adv_ratio) <= 1.0:
            raise ValueError(f"method_args.adv_ratio must be in [0, 1]; got {adv_ratio!r}")
        self.adv_ratio = float(adv_ratio)

    def setup(self, model, data, ctx):
        if self.mixing is Mixing.MANIFOLD:
            check_model_stages(model, self.stages)

    def _draw(self, n, ctx, device):
        """(stage or None, mix or None) for one half: the stage first, as manifold_mixup."""
        stage = None
        if self.mixing is Mixing.MANIFOLD and self.mixup_alpha > 0:
            stage = draw_stage(self.stages, ctx.generator)
        return stage, draw_mix(n, self.mixup_alpha, self.variant, ctx.generator, device)

    def _plans(self, halves, starts):
        return [StageMix(stage, mix, start, rows) for (stage, mix, rows), start
                in zip(halves, starts) if stage is not None]

    def loss(self, model, x, y, ctx):
        with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
            labels = ATTACK_LABELS[self.attack_labels](model, x, y)
            x_adv = pgd(model, x, labels, self.threat, alpha=self.alpha, steps=self.steps,
                        generator=ctx.generator)
        n = len(y)
        clean_stage, clean_mix = self._draw(n, ctx, x.device)
        adv_stage, adv_mix = self._draw(n, ctx, x.device)
        halves = [(clean_stage, clean_mix, n), (adv_stage, adv_mix, n)]
        inputs = [x, x_adv]
        if self.mixing is Mixing.INPUT:
            inputs = [mix_inputs(clean_mix, x), mix_inputs(adv_mix, x_adv)]
        if self.forward is Forward.JOINT:
            with mixed_at(model, self._plans(halves, (0, n))):
                logits_clean, logits_adv = model(torch.cat(inputs)).split(n)
        else:
            with mixed_at(model, self._plans(halves[:1], (0,))):
                logits_clean = model(inputs[0])
            with mixed_at(model, self._plans(halves[1:], (0,))):
                logits_adv = model(inputs[1])
        criterion = LOSSES[self.criterion]
        classes = logits_clean.shape[1]
        loss_clean = criterion(logits_clean, mix_targets(clean_mix, y, classes))
        loss_adv = criterion(logits_adv, mix_targets(adv_mix, y, classes))
        for key, mix in (("lambda_clean", clean_mix), ("lambda_adv", adv_mix)):
            ctx.stats[key] = 1.0 if mix is None else mix.mean_lambda()
        for stage in (clean_stage, adv_stage):
            if stage is not None:
                ctx.stats[f"mixed_at_{stage}"] = ctx.stats.get(f"mixed_at_{stage}", 0.0) + 0.5
        return (1 - self.adv_ratio) * loss_clean + self.adv_ratio * loss_adv
