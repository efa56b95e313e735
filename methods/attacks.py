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
``(model, x, y, spec, threat, generator, gradient=None)`` with a normalized spec
(:func:`methods.attack_specs.normalize_attack_spec`) and the threat that attack uses (the spec's
own ``eps`` / ``norm`` already applied), and returns a list of :class:`AttackRun`: one per
adversarial batch it produced (targeted ``all``: one per wrong class).  The evaluation checks
every run's ``x_adv`` itself and decides robustness from the model's own predictions.

Attacks against evaluation-time defences (:mod:`methods.defenses`) use two more seams here:

* a *gradient function* (``gradient=``, :data:`GradientFn`) replaces the plain
  :func:`logits_and_gradient` inside FGSM and PGD.  :func:`eot_gradient` is the one for
  randomized defences: Expectation over Transformation (Athalye, Carlini, Wagner, ICML 2018;
  Athalye et al. 2018, "Synthesizing robust adversarial examples"), the summed cross-entropy of
  ``samples`` independent draws of the defended model, differentiated through the defence
  (mixing, noise, rotation, resize), so each step follows the gradient averaged over draws.
  With one draw of a deterministic predictor it is :func:`logits_and_gradient` operation for
  operation, so EOT-PGD equals PGD bit for bit there (tested);
* *label policies* (:data:`LABEL_POLICIES`, :func:`attack_labels`): an untargeted attack either
  pushes away from the true label (``true``) or, as Mixup Inference's code does (cleverhans'
  ``y=None``, avoiding label leaking), from the attacked predictor's own prediction on the clean
  input (``predicted``).  Robustness is still judged against the true label.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ATTACKS
from .threat import ThreatModel, clamp_to_image

#: ``(x, delta, goal, targeted) -> (logits, gradient w.r.t. delta)``: the step direction of FGSM
#: and PGD; ``logits`` (or log-probabilities) at ``x + delta`` decide PGD's early stop.
GradientFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool],
                      Tuple[torch.Tensor, torch.Tensor]]


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


def eot_gradient(draws: Callable[[torch.Tensor, int], torch.Tensor], samples: int,
                 chunk: Optional[int] = None) -> GradientFn:
    """Expectation over Transformation: a :data:`GradientFn` over ``samples`` draws.

    ``draws(x_in, k)`` returns the logits of ``k`` independent draws of a randomized predictor
    at ``x_in``, shape ``(k, B, C)``, differentiable w.r.t. ``x_in`` (each call draws fresh
    randomness); every chunk of one step gets the same ``x_in`` tensor.  The gradient is that
    of the cross-entropy summed over draws and examples
    (``-CE`` when targeted), i.e. ``samples`` times the average gradient; FGSM's and PGD's steps
    (sign for Linf, normalized for L2) do not depend on that scale.  The draws are evaluated
    ``chunk`` at a time (default all), one backward each, gradients summed, so memory holds at
    most ``chunk * B`` rows.  The returned logits (for PGD's early stop) are one draw's logits
    when ``samples == 1``, else the log of the softmax averaged over the draws.
    """
    if samples < 1:
        raise ValueError(f"eot_gradient: samples must be >= 1, got {samples}")
    per = samples if chunk is None else max(1, min(int(chunk), samples))

    def gradient(x: torch.Tensor, delta: torch.Tensor, goal: torch.Tensor,
                 targeted: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        delta = delta.detach().requires_grad_(True)
        x_in = x + delta   # one tensor for every chunk, so ``draws`` may reuse per-input work
        grad, outputs, done = None, [], 0
        while done < samples:
            k = min(per, samples - done)
            logits = draws(x_in, k)
            loss = F.cross_entropy(logits.flatten(0, 1), goal.repeat(k), reduction="sum")
            if targeted:
                loss = -loss
            done += k
            (g,) = torch.autograd.grad(loss, delta, retain_graph=done < samples)
            grad = g if grad is None else grad + g
            outputs.append(logits.detach())
        logits = torch.cat(outputs)
        if samples == 1:
            return logits[0], grad.detach()
        mean_log_prob = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(samples)
        return mean_log_prob, grad.detach()

    return gradient


def _true_labels(predictor: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


@torch.no_grad()
def _predicted_labels(predictor: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return predictor(x).argmax(dim=1)


#: Untargeted label policy -> ``(predictor, x, y) -> the labels the attack pushes away from``.
LABEL_POLICIES: Dict[str, Callable[..., torch.Tensor]] = {
    "true": _true_labels, "predicted": _predicted_labels}


def attack_labels(predictor: nn.Module, x: torch.Tensor, y: torch.Tensor, policy: str) -> torch.Tensor:
    """The labels an untargeted attack uses: ``y`` (``true``) or the predictor's prediction on
    the clean ``x`` (``predicted``, as Mixup Inference's code).  Targeted attacks draw their
    targets against ``y`` and always take ``true``."""
    try:
        return LABEL_POLICIES[policy](predictor, x, y)
    except KeyError:
        raise ValueError(f"labels: unknown policy {policy!r}; known: {sorted(LABEL_POLICIES)}") from None


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
         alpha: Optional[float] = None, gradient: Optional[GradientFn] = None) -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015) from the clean point, step ``alpha`` (default eps).
    ``gradient``: the step direction (default :func:`logits_and_gradient` of ``model``)."""
    step = threat.eps if alpha is None else alpha
    delta = torch.zeros_like(x)
    if gradient is None:
        grad = input_gradient(model, x, delta, y)
    else:
        grad = gradient(x, delta, y, False)[1]
    delta = threat.ascent(delta, grad, step)
    delta = clamp_to_image(x, threat.project(delta))
    return (x + delta).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
        alpha: float, steps: int, restarts: int = 1, random_start: bool = True,
        target: Optional[torch.Tensor] = None, early_stop: bool = False,
        generator: Optional[torch.Generator] = None,
        gradient: Optional[GradientFn] = None) -> torch.Tensor:
    """Projected gradient descent; returns the per-example worst case over ``restarts``.

    ``target``: if given, a targeted attack towards these classes (success = predicting them);
    otherwise untargeted against ``y``.  ``early_stop``: stop moving an example once it is
    fooled (locuslab's evaluation), and compute only the rows still moving; use it only with
    the model in eval mode (in train mode BatchNorm would see a different batch).  Training
    attacks (Madry) leave it off.  ``gradient``: the step direction and the early-stop logits
    (default :func:`logits_and_gradient` of ``model``; :func:`eot_gradient` for a randomized
    defence); ``model`` itself then only scores restarts.
    """
    if gradient is None:
        def gradient(xa, da, ga, targeted):
            return logits_and_gradient(model, xa, da, ga, targeted=targeted)
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
                logits, grad = gradient(xa, da, ga, targeted)
                keep = ~_fooled(logits, y[active], target[active] if targeted else None)
                stepped = clamp_to_image(xa, threat.project(threat.ascent(da, grad, alpha)))
                delta = delta.clone()
                delta[active[keep]] = stepped[keep]
                active = active[keep]
                if active.numel() == 0:
                    break
            else:
                _, grad = gradient(x, delta, goal, targeted)
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
             generator: Optional[torch.Generator] = None,
             gradient: Optional[GradientFn] = None) -> List[AttackRun]:
    """FGSM with step eps from the clean point (the spec has no other knobs); ``gradient`` as
    in :func:`fgsm`."""
    return [AttackRun(fgsm(model, x, y, threat, gradient=gradient))]


@ATTACKS.register("pgd")
def run_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Dict, threat: ThreatModel,
            generator: Optional[torch.Generator] = None,
            gradient: Optional[GradientFn] = None) -> List[AttackRun]:
    """PGD as the spec says; targeted specs draw their targets (:data:`TARGET_POLICIES`) from
    the clean logits and ``generator`` (before any random start) and run once per target set.
    ``gradient`` as in :func:`pgd` (``model`` then scores restarts and targets)."""
    kwargs = dict(alpha=float(spec["alpha"]), steps=int(spec["steps"]),
                  restarts=int(spec["restarts"]), random_start=bool(spec["random_start"]),
                  early_stop=bool(spec["early_stop"]), generator=generator, gradient=gradient)
    policy = spec.get("targeted")
    if policy is None:
        return [AttackRun(pgd(model, x, y, threat, **kwargs))]
    with torch.no_grad():
        logits = model(x)
    targets = TARGET_POLICIES[policy](logits, y, generator)
    return [AttackRun(pgd(model, x, y, threat, target=t, **kwargs), t) for t in targets]
