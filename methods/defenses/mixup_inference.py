"""Mixup Inference (MI): Pang, Xu, Zhu, "Mixup Inference: Better Exploiting Mixup to Defend
Adversarial Attacks", ICLR 2020 (arXiv:1909.11515).  Official code: ``P2333/Mixup-Inference``
@6d164cba, files ``attack_resnet_mixuptest_PL.py`` (MI-PL), ``attack_resnet_mixuptest_OL.py``
(MI-OL; loop ``for k in range(num_sample)`` mixing ``(1 - lamda) * mixup_pool[label][index] +
lamda * img``), ``attack_resnet_mixuptest_Combined.py`` (MI-Combined) and
``attack_resnet_mixuptest_OL_adaptive.py`` (the adaptive attack).

Algorithm 1, for an input x and the model F (its prediction y_hat = argmax F(x))::

    F_MI(x) = (1/N) sum_{k=1..N} softmax(F(lam * x + (1 - lam) * x_{s,k})),
              y_{s,k} ~ p_s(y_s),  x_{s,k} ~ p_s(x_s | y_{s,k})

* **MI-PL** (``mi_pl``): y_s = y_hat; N 10 (hard-coded ``num_sample`` of the PL script), lam 0.5.
* **MI-OL** (``mi_ol``): y_s uniform over the labels other than y_hat (the code redraws
  ``np.random.randint`` until it differs; here ``(y_hat + U{1..C-1}) mod C``, the same
  distribution); N 30 (``num_sample``), lam 0.5 for mixup models and 0.6 for IAT models (the
  README), a spec argument ``lam``.
* **MI-Combined** (``mi_combined``): MI-PL with N_PL 5, lam_PL 0.5; if ``max softmax F(x) -
  max F_PL(x) < threshold`` (0.2) the output is F_PL, else MI-OL with N_OL 15, lam_OL 0.4 (the
  README command; the script's flag default is 0.5).  The gap is a detector: an adversarial
  input loses confidence under PL mixing.

x_s is drawn uniformly from the pool images of class y_s.  y_hat is the prediction on the very
input being classified (the code uses ``predicted_adv`` for the adversarial input).  Mixing is
done on [0, 1] images; the code mixes [-1, 1] images, the same thing (normalisation is affine).

Sampling pool (:func:`methods.defenses.base.build_pool`; the spec's ``pool`` fields):
**departure**: by default the pool comes from the validation split, else the training split
with clean labels, so it never holds an evaluated image.  The official code's pool is the test
split itself (``train=False``: the first 10,000 images of a shuffled test loader, 1,000 for
MI-PL), loaded with the training transforms (random flip and crop, drawn once per pool image):
``pool: test_split_as_official`` with ``pool_size`` 10000 (1000 for MI-PL) and the default
``pool_augmentation: training`` reproduces that.

Adaptive attacks differentiate through the mixing (:meth:`MixupInference.draws`: the gradient
reaches x through ``lam * x``); the choice of the partner classes depends on y_hat and is not
differentiated.  The official adaptive attack (``OL_adaptive.py``) draws ``adaptive_num``
partners once per input and averages the PGD gradient over the mixed copies:
``eot_redraw: once`` in the attack entry keeps the same random numbers at every step.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DEFENSES
from .base import Defense, DefenseContext, SamplePool

#: Partner-class rules: predicted labels (y_hat, ``pl``) or other labels (uniform != y_hat, ``ol``).
PARTNER_RULES = ("pl", "ol")


class MixupInference(Defense):
    """MI with one partner rule (:data:`PARTNER_RULES`), ratio ``lam`` and ``samples`` draws."""

    rule = "ol"

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.lam = float(self.spec["lam"])
        self.pool: Optional[SamplePool] = None

    def setup(self, ctx: DefenseContext) -> None:
        super().setup(ctx)
        self.pool = ctx.pool(self.spec)

    @torch.no_grad()
    def prepare(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """y_hat: the model's prediction on ``x``."""
        return model(x).argmax(dim=1)

    def partner_classes(self, predicted: torch.Tensor, generator: torch.Generator,
                        k: int) -> torch.Tensor:
        """``(k, B)`` classes y_s (CPU): y_hat (PL), or ``(y_hat + U{1..C-1}) mod C`` (OL: one
        draw per entry from ``generator``)."""
        pred = predicted.detach().cpu().long()
        if self.rule == "pl":
            return pred.expand(k, -1).clone()
        offset = torch.randint(1, self.num_classes, (k, len(pred)), generator=generator)
        return (pred.unsqueeze(0) + offset) % self.num_classes

    def partners(self, predicted: torch.Tensor, generator: torch.Generator, k: int) -> torch.Tensor:
        """``(k, B)`` pool rows: the classes (:meth:`partner_classes`), then one image of each,
        uniform within its class (:meth:`SamplePool.sample`), in that order from ``generator``."""
        return self.pool.sample(self.partner_classes(predicted, generator, k), generator)

    def mix(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``lam * x + (1 - lam) * x_s`` for every draw: ``(k, B, C, H, W)``."""
        return self.lam * x.unsqueeze(0) + (1.0 - self.lam) * self.pool.x[rows]

    def draws(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, k: int,
              prepared: Any = None) -> torch.Tensor:
        predicted = self.prepare(model, x) if prepared is None else prepared
        mixed = self.mix(x, self.partners(predicted, generator, k))
        return model(mixed.flatten(0, 1)).view(k, len(x), -1)

    def describe(self):
        return {**super().describe(), "pool": self.pool.record if self.pool else None,
                "partner_rule": self.rule, "lam": self.lam}


@DEFENSES.register("mi_pl")
class MixupInferencePL(MixupInference):
    """MI-PL: partners of the predicted class."""

    rule = "pl"


@DEFENSES.register("mi_ol")
class MixupInferenceOL(MixupInference):
    """MI-OL: partners of a uniformly drawn other class."""

    rule = "ol"


def _part(spec: Mapping[str, Any], name: str, lam: float, samples: int) -> dict:
    pool = {k: spec[k] for k in ("pool", "pool_size", "pool_augmentation")}
    return {"name": name, "lam": lam, "samples": samples, **pool}


@DEFENSES.register("mi_combined")
class MixupInferenceCombined(Defense):
    """MI-Combined: the PL gate, then PL or OL per input (see the module docstring).

    ``samples`` overrides (``DefendedModel(samples=...)``) set both N_PL and N_OL."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.threshold = float(self.spec["threshold"])
        self.pl = MixupInferencePL(_part(self.spec, "mi_pl", self.spec["lam_pl"], self.spec["samples_pl"]))
        self.ol = MixupInferenceOL(_part(self.spec, "mi_ol", self.spec["lam_ol"], self.spec["samples_ol"]))

    @property
    def samples(self) -> int:
        return self.pl.samples + self.ol.samples

    def setup(self, ctx: DefenseContext) -> None:
        super().setup(ctx)
        self.pl.setup(ctx)
        self.ol.setup(ctx)

    @torch.no_grad()
    def prepare(self, model: nn.Module, x: torch.Tensor):
        """``(max softmax F(x), y_hat)``."""
        confidence, predicted = F.softmax(model(x), dim=1).max(dim=1)
        return confidence, predicted

    def gate(self, confidence: torch.Tensor, log_probs_pl: torch.Tensor) -> torch.Tensor:
        """True where PL's output is kept: ``max F(x) - max F_PL(x) < threshold``."""
        return (confidence - log_probs_pl.detach().exp().max(dim=1).values) < self.threshold

    def log_probs(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                  samples: Optional[int] = None, prepared: Any = None) -> torch.Tensor:
        confidence, predicted = self.prepare(model, x) if prepared is None else prepared
        out = self.pl.log_probs(model, x, generator, samples, predicted)
        use_ol = torch.nonzero(~self.gate(confidence, out)).flatten()
        if len(use_ol):
            out = out.clone()
            out[use_ol] = self.ol.log_probs(model, x[use_ol], generator, samples, predicted[use_ol])
        return out

    def draws(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, k: int,
              prepared: Any = None) -> torch.Tensor:
        """``k`` draws of the branch the gate picks for each input (the gate itself from one
        PL estimate without gradients): PL mixings where PL is kept, OL mixings elsewhere."""
        confidence, predicted = self.prepare(model, x) if prepared is None else prepared
        with torch.no_grad():
            keep_pl = self.gate(confidence, self.pl.log_probs(model, x, generator, None, predicted))
        out = x.new_empty(k, len(x), self.num_classes)
        for rows, part in ((torch.nonzero(keep_pl).flatten(), self.pl),
                           (torch.nonzero(~keep_pl).flatten(), self.ol)):
            if len(rows):
                out[:, rows] = part.draws(model, x[rows], generator, k, predicted[rows])
        return out

    def describe(self):
        return {**super().describe(), "pool": self.pl.pool.record if self.pl.pool else None,
                "threshold": self.threshold,
                "pl": {"lam": self.pl.lam, "samples": self.pl.samples},
                "ol": {"lam": self.ol.lam, "samples": self.ol.samples}}
