"""Manifold Mixup: Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz, Bengio, "Manifold Mixup:
Better Representations by Interpolating Hidden States", ICML 2019, arXiv:1806.05236; official code
vikasverma1077/manifold_mixup @870ef77c ``supervised/`` (spec 2.2).

Per step, as coded (``models/preresnet.py`` L101-150 with ``mixup_hidden=True``; ``utils.py``
L127-136 ``mixup_process``, L153-159 ``get_lambda``): draw the layer uniformly among the eligible
ones (``layer_mix = random.randint(0, 2)``: 0 the input, 1 the output of residual stage 1, 2 the
output of residual stage 2), then one lambda ~ Beta(alpha, alpha) for the batch, then one
permutation; at that layer ``h <- lam h + (1 - lam) h[perm]`` and the one-hot targets are mixed
alike; the rest of the forward runs on the mixed hidden state.  The loss is the repo's for every
training mode (``main.py`` L184-185, L237): ``nn.BCELoss()(softmax(out), mixed_target)``.

Here the eligible layers are named stages of the model (``stages``, default
``["input", "stage1", "stage2"]``: the normalised input and the outputs of the first two
residual stages / conv blocks, ``model.stage_module``), and the mixing is a forward hook at the
drawn stage (:func:`.mixing.mixed_at`), removed after the step even on an exception.  alpha 2 is
the paper's Manifold Mixup; **input mixup** in this repo is the same code with ``layer_mix = 0``,
i.e. ``stages: [input]`` with alpha 1; ``alpha: 0`` is the repo's ``--train vanilla`` (no mixing,
still BCE on softmax).

Options (``method_args``), each runnable:

* ``criterion``: ``bce_softmax`` (as coded, default), ``soft_ce`` (cross-entropy against the
  mixed one-hot target, the usual reading of the paper's loss) or ``ce`` (mixup-cifar10's
  two-label form).  Named ``criterion`` because ``loss`` is the method's hook.
* ``stages``: any stages the model declares (a stage it does not declare is an error naming it).

The repo's attack runs (``--adv_unpre``) standardise each image inside the model
(``load_data.per_image_standardization``); that normalisation is a recipe setting, not part of
this method (see ``workflow/config/papers/mixup.yaml``).
"""
from __future__ import annotations

from typing import Sequence

from ..registry import METHODS
from .base import Method
from .mixing import (LOSSES, MixVariant, StageMix, check_alpha, check_loss, check_model_stages,
                     check_stages, draw_mix, draw_stage, mix_targets, mixed_at)


@METHODS.register("manifold_mixup")
class ManifoldMixup(Method):
    name = "manifold_mixup"
    paper = ("Verma et al. Manifold Mixup: Better Representations by Interpolating Hidden States. "
             "ICML 2019 (vikasverma1077/manifold_mixup)")

    def __init__(self, *, threat, alpha: float = 2.0,
                 stages: Sequence[str] = ("input", "stage1", "stage2"),
                 criterion: str = "bce_softmax") -> None:
        super().__init__(threat=threat)
        self.alpha = check_alpha(alpha)
        self.stages = check_stages(stages)
        self.criterion = check_loss(criterion)

    def setup(self, model, data, ctx):
        check_model_stages(model, self.stages)

    def loss(self, model, x, y, ctx):
        if self.alpha == 0:                      # --train vanilla: no layer, no lambda drawn
            logits = model(x)
            ctx.stats["lambda"] = 1.0
            return LOSSES[self.criterion](logits, mix_targets(None, y, logits.shape[1]))
        stage = draw_stage(self.stages, ctx.generator)
        mix = draw_mix(len(y), self.alpha, MixVariant.BATCH, ctx.generator, x.device)
        with mixed_at(model, [StageMix(stage, mix)]):
            logits = model(x)
        ctx.stats["lambda"] = mix.mean_lambda()
        ctx.stats[f"mixed_at_{stage}"] = 1.0     # per-epoch mean: the fraction of steps
        return LOSSES[self.criterion](logits, mix_targets(mix, y, logits.shape[1]))
