"""What every evaluation shares: accuracies with exact intervals and per-class counts, the
adversarial-example guards, batched prediction and one attack run over a set of examples.

Used by :mod:`methods.evaluation` (the base model) and :mod:`methods.defenses.evaluate`
(defended predictors); it imports neither.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from scipy.stats import binomtest
from torch import nn

from . import attacks  # noqa: F401  (fills ATTACKS)
from .registry import ATTACKS
from .runtime import cpu_generator
from .threat import ThreatModel

TOLERANCE = 1e-6


def accuracy_ci(correct: int, total: int) -> Dict[str, Any]:
    """Accuracy with its exact 95% binomial (Clopper-Pearson) interval."""
    if total == 0:
        return {"acc": None, "ci95": [None, None], "correct": 0, "n": 0}
    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="exact")
    return {"acc": correct / total, "ci95": [float(ci.low), float(ci.high)],
            "correct": int(correct), "n": int(total)}


def per_class_counts(ok: torch.Tensor, y: torch.Tensor, num_classes: int) -> Dict[str, list]:
    """``{"correct": [...], "total": [...]}``: per class id, how many examples of that class
    were counted correct (``ok``) and how many there were; both lists have ``num_classes``
    entries and sum to the accuracy's ``correct`` and ``n``."""
    y = y.detach().cpu().long()
    ok = ok.detach().cpu().bool()
    return {"correct": torch.bincount(y[ok], minlength=num_classes).tolist(),
            "total": torch.bincount(y, minlength=num_classes).tolist()}


def accuracy_record(ok: torch.Tensor, y: torch.Tensor, num_classes: int) -> Dict[str, Any]:
    """:func:`accuracy_ci` of the flags ``ok`` plus their :func:`per_class_counts`."""
    return {**accuracy_ci(int(ok.sum()), len(ok)), "per_class": per_class_counts(ok, y, num_classes)}


def buffers_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        h.update(name.encode())
        h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel, what: str) -> float:
    """Raise unless x_adv is a valid image within the threat model; return the max distance."""
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AssertionError(f"{what}: adversarial images leave [0, 1]")
    dist = float(threat.distance(x_adv - x).max()) if len(x) else 0.0
    if dist > threat.eps + TOLERANCE:
        raise AssertionError(f"{what}: perturbation {dist:.8f} exceeds eps {threat.eps}")
    return dist


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def run_attack(model: nn.Module, spec: Dict[str, Any], threat: ThreatModel, x: torch.Tensor,
               y: torch.Tensor, batch_size: int, seed: int, what: str, *,
               resume: Optional[Any] = None,
               bar: Optional[Callable[..., Iterable[int]]] = None) -> Tuple[torch.Tensor, float]:
    """Robust flags (bool, (N,)) of ``x, y`` under a normalized attack spec, and the largest
    perturbation seen.  Batches of ``batch_size`` share one generator seeded with ``seed``;
    every adversarial batch is checked against ``threat`` (:func:`check_adversarial`).

    ``resume`` (optional, :class:`methods.eval_resume.UnitProgress`): ``resume.load()`` gives
    what an earlier session saved and ``resume.save(progress)`` is called after every batch with
    the flags so far, the largest distance, the index of the next batch and the generator's
    state, so a killed run continues at its first unfinished batch with the generator exactly
    where the uninterrupted run has it: same draws, same flags.  Saved progress of another
    ``batch_size`` or example count is ignored.  ``bar(starts, total=, desc=)`` wraps the batch
    loop (a progress bar)."""
    implementation = ATTACKS.get(spec["name"])
    generator = cpu_generator(seed)
    flags, worst, start = [], 0.0, 0
    saved = resume.load() if resume is not None else None
    if saved and saved.get("batch_size") == batch_size and saved.get("n") == len(x) \
            and saved.get("seed") == seed:
        flags = [saved["flags"].to(y.device)]
        worst, start = float(saved["worst"]), int(saved["next"])
        generator.set_state(saved["generator"])
    starts = range(start, len(x), batch_size)
    batches = bar(starts, total=len(starts), desc=what) if bar is not None else starts
    for i in batches:
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        runs = implementation(model, xb, yb, spec, threat, generator)
        ok = torch.ones(len(yb), dtype=torch.bool, device=yb.device)
        if any(run.target is not None for run in runs):
            ok &= predict(model, xb, batch_size) == yb   # targeted: robust needs a right answer
        for run in runs:
            worst = max(worst, check_adversarial(xb, run.x_adv, threat, what))
            ok &= ~run.fooled(predict(model, run.x_adv, batch_size), yb)
        flags.append(ok)
        if resume is not None:
            resume.save({"next": i + batch_size, "batch_size": batch_size, "n": len(x),
                         "seed": seed, "flags": torch.cat(flags).cpu(), "worst": worst,
                         "generator": generator.get_state()})
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool), worst


def window_name(label: str) -> str:
    """Measurement windows are '/'-joined paths: ``eps=8/255`` becomes ``eps=8|255`` there."""
    return label.replace("/", "|")


def threat_dict(threat: ThreatModel) -> Dict[str, Any]:
    return {"norm": threat.norm.value, "eps": threat.eps}
