"""White-box attacks in pixel space: FGSM and PGD (untargeted or targeted, Linf or L2).

All attacks take a model that maps [0, 1] images to logits (normalisation lives inside the
model), labels ``y`` and a :class:`~methods.threat.ThreatModel`, and return adversarial images
``x_adv`` in [0, 1] with ``threat.distance(x_adv - x) <= eps``.  They do not change the model's
mode: training methods choose it with :func:`methods.algorithms.base.attack_mode`, and evaluation
forces eval mode itself.

PGD follows Madry et al. (2018) with the evaluation conventions of locuslab/fast_adversarial and
N-FGSM (spec section 2.5): uniform random start, sign steps, projection and image clamp after
every step, optional per-example early stop (only still-correct examples keep moving), and the
per-example worst case over restarts: an example counts as robust only if no restart fools it.

Evaluation runs attacks by name through :data:`methods.registry.ATTACKS`: each entry takes
``(model, x, y, spec, threat, generator)`` with a normalized spec
(:func:`methods.attack_specs.normalize_attack_spec`) and the threat that attack uses (the spec's
own ``eps`` / ``norm`` already applied), and returns a list of :class:`AttackRun`: one per
adversarial batch it produced (targeted ``all``: one per wrong class).  The evaluation checks
every run's ``x_adv`` itself and decides robustness from the model's own predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ATTACKS
from .threat import ThreatModel, clamp_to_image


def logits_and_gradient(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
                        targeted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at ``x + delta`` and the gradient of the summed cross-entropy w.r.t. ``delta``.

    Summed (not mean) so each example's gradient does not depend on the batch size; for a
    targeted attack ``y`` holds the target classes and the gradient of ``-CE`` is returned.
    One forward and one backward pass.
    """
    delta = delta.detach().requires_grad_(True)
    logits = model(x + delta)
    loss = F.cross_entropy(logits, y, reduction="sum")
    if targeted:
        loss = -loss
    (grad,) = torch.autograd.grad(loss, delta)
    return logits.detach(), grad.detach()


def input_gradient(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
                   targeted: bool = False) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. ``delta`` (see :func:`logits_and_gradient`)."""
    return logits_and_gradient(model, x, delta, y, targeted)[1]


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
         alpha: Optional[float] = None) -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015) from the clean point, step ``alpha`` (default eps)."""
    step = threat.eps if alpha is None else alpha
    delta = torch.zeros_like(x)
    delta = threat.ascent(delta, input_gradient(model, x, delta, y), step)
    delta = clamp_to_image(x, threat.project(delta))
    return (x + delta).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
        alpha: float, steps: int, restarts: int = 1, random_start: bool = True,
        target: Optional[torch.Tensor] = None, early_stop: bool = False,
        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Projected gradient descent; returns the per-example worst case over ``restarts``.

    ``target``: if given, a targeted attack towards these classes (success = predicting them);
    otherwise untargeted against ``y``.  ``early_stop``: stop moving an example once it is
    fooled (locuslab's evaluation), and compute only the rows still moving; use it only with
    the model in eval mode (in train mode BatchNorm would see a different batch).  Training
    attacks (Madry) leave it off.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"pgd needs steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    targeted = target is not None
    goal = target if targeted else y
    best = x.detach().clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        if random_start:
            delta = clamp_to_image(x, threat.random_start(x, generator=generator))
        else:
            delta = torch.zeros_like(x)
        active = torch.arange(x.shape[0], device=x.device)  # rows still being attacked
        for _ in range(steps):
            if early_stop:
                # Only examples the current delta does not fool move on (and are computed:
                # the model is in eval mode here, so rows do not interact).
                xa, da, ga = x[active], delta[active], goal[active]
                logits, grad = logits_and_gradient(model, xa, da, ga, targeted=targeted)
                keep = ~_fooled(logits, y[active], target[active] if targeted else None)
                stepped = clamp_to_image(xa, threat.project(threat.ascent(da, grad, alpha)))
                delta = delta.clone()
                delta[active[keep]] = stepped[keep]
                active = active[keep]
                if active.numel() == 0:
                    break
            else:
                _, grad = logits_and_gradient(model, x, delta, goal, targeted=targeted)
                delta = clamp_to_image(x, threat.project(threat.ascent(delta, grad, alpha)))
        if restarts == 1:
            return (x + delta).detach()  # nothing to compare against: skip the scoring forward
        with torch.no_grad():
            logits = model(x + delta)
            loss = F.cross_entropy(logits, goal, reduction="none")
            if targeted:
                loss = -loss
            fooled = _fooled(logits, y, target)
            # Worse for the defender: fooled beats not fooled; between equals, higher loss.
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(_rows(better, x), x + delta, best)
            best_loss = torch.where(better, loss, best_loss)
            best_fooled |= fooled
    return best.detach()


def _fooled(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    return _fooled_pred(logits.argmax(dim=1), y, target)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- evaluation attacks

@dataclass(frozen=True)
class AttackRun:
    """One adversarial batch: ``x_adv`` and, for a targeted run, the ``target`` classes (N,)."""

    x_adv: torch.Tensor
    target: Optional[torch.Tensor] = None

    def fooled(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Success per example: prediction equals the target (targeted) or differs from ``y``."""
        return _fooled_pred(pred, y, self.target)


def _fooled_pred(pred: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    return pred == target if target is not None else pred != y


def _random_targets(logits: torch.Tensor, y: torch.Tensor, generator) -> List[torch.Tensor]:
    """One wrong class per example, uniform over the other C - 1 classes (seeded)."""
    classes = logits.shape[1]
    offset = torch.randint(1, classes, (len(y),), generator=generator, device="cpu").to(y.device)
    return [(y + offset) % classes]


def _least_likely_targets(logits: torch.Tensor, y: torch.Tensor, generator) -> List[torch.Tensor]:
    """The wrong class the model scores lowest on the clean input."""
    masked = logits.clone()
    masked[torch.arange(len(y), device=y.device), y] = float("inf")
    return [masked.argmin(dim=1)]


def _all_targets(logits: torch.Tensor, y: torch.Tensor, generator) -> List[torch.Tensor]:
    """Every wrong class in turn: targets ``(y + k) mod C`` for k = 1 .. C-1."""
    classes = logits.shape[1]
    return [(y + k) % classes for k in range(1, classes)]


#: ``targeted`` policy -> ``(clean logits, y, generator) -> list of target tensors``.
TARGET_POLICIES: Dict[str, Callable[..., List[torch.Tensor]]] = {
    "random": _random_targets, "least_likely": _least_likely_targets, "all": _all_targets}


@ATTACKS.register("fgsm")
def run_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Dict, threat: ThreatModel,
             generator: Optional[torch.Generator] = None) -> List[AttackRun]:
    """FGSM with step eps from the clean point (the spec has no other knobs)."""
    return [AttackRun(fgsm(model, x, y, threat))]


@ATTACKS.register("pgd")
def run_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Dict, threat: ThreatModel,
            generator: Optional[torch.Generator] = None) -> List[AttackRun]:
    """PGD as the spec says; targeted specs draw their targets (:data:`TARGET_POLICIES`) from
    the clean logits and ``generator`` (before any random start) and run once per target set."""
    kwargs = dict(alpha=float(spec["alpha"]), steps=int(spec["steps"]),
                  restarts=int(spec["restarts"]), random_start=bool(spec["random_start"]),
                  early_stop=bool(spec["early_stop"]), generator=generator)
    policy = spec.get("targeted")
    if policy is None:
        return [AttackRun(pgd(model, x, y, threat, **kwargs))]
    with torch.no_grad():
        logits = model(x)
    targets = TARGET_POLICIES[policy](logits, y, generator)
    return [AttackRun(pgd(model, x, y, threat, target=t, **kwargs), t) for t in targets]
