"""Shared pieces of the mixing methods (:mod:`.mixup`, :mod:`.manifold_mixup`, :mod:`.iat`):
seeded draws of the mixing coefficients and partners, the mixed batch (inputs or hidden states),
the mixed targets, and the losses the official codes use.

**A mix** (:class:`Mix`) says how a batch of B rows is interpolated: row i of the mixed batch is
``lam_i * h[first_i] + (1 - lam_i) * h[second_i]``, and its target is the same combination of the
one-hot labels, ``lam_i * onehot(y[first_i]) + (1 - lam_i) * onehot(y[second_i])``.  Two ways of
drawing one (``variant``, :data:`VARIANTS`), every draw from the method's checkpointed generator
(:mod:`.randomness`), so a resumed run mixes exactly as an uninterrupted one:

* ``batch``: one lambda ~ Beta(alpha, alpha) for the whole batch, then one permutation ``perm``;
  ``first`` is the identity, ``second = perm``.  facebookresearch/mixup-cifar10 @eaff31ab
  ``train.py`` L119-134 (``mixup_data``: ``lam * x + (1 - lam) * x[index]``) and
  vikasverma1077/manifold_mixup @870ef77c ``supervised/utils.py`` L127-136 (``mixup_process``:
  ``out * lam + out[indices] * (1 - lam)``, lambda from ``get_lambda`` L153-159).
* ``per_sample``: two independent permutations ``pi1``, ``pi2``, then one lambda ~ Beta(alpha,
  alpha) per row: ``lam_i x[pi1_i] + (1 - lam_i) x[pi2_i]``.  P2333/Mixup-Inference @6d164cba
  ``train_resnet_mixup.py`` L184-210 (``shuffle_minibatch``, with one-hot targets mixed alike).

``alpha = 0`` means no mixing (:func:`draw_mix` returns ``None`` and draws nothing): the codes'
``lam = 1`` (mixup-cifar10 L121-124, manifold_mixup ``get_lambda``) and "return inputs, targets"
(Mixup-Inference L185-186).  The targets are then the plain labels.

**Losses** (the methods' ``criterion``, :data:`LOSSES`), each ``(logits, MixedTargets) -> scalar``:

* ``ce``: ``lam * CE(out, y_a) + (1 - lam) * CE(out, y_b)``, mixup-cifar10 ``mixup_criterion``
  (L137-138) as coded; with a per-row lambda each row's two cross-entropies are weighted by its own
  lambda and the rows averaged.  Mathematically equal to ``soft_ce``.
* ``soft_ce``: ``mean_i -sum_c t_ic log softmax(out_i)_c`` with the mixed one-hot target ``t``,
  Mixup-Inference ``Torture/loss_function.py`` ``soft_cross_entropy``.
* ``bce_softmax``: ``nn.BCELoss()(softmax(out), t)``, the mean over all B x C entries of
  ``-(t log p + (1 - t) log(1 - p))`` (logs clamped at -100 as BCELoss does), manifold_mixup
  ``supervised/main.py`` L184-185 and L221/L237/L254: the repo trains every mode this way,
  vanilla included.  Computed in float32 outside autocast (BCE is not autocast-safe); ``soft_ce``
  in float32 too.

**Mixing a hidden stage** (:func:`mixed_at`): a forward hook on ``model.stage_module(stage)``
replaces that stage's output ``h`` by the mixed one, so the stages before it see the unmixed
batch and everything after it the mixed one, as the official PreActResNet's
``forward(..., mixup_hidden=True)`` does at its drawn ``layer_mix`` (manifold_mixup
``supervised/models/preresnet.py`` L101-150).  A :class:`StageMix` may cover only a block of rows
(Interpolated AT's joint forward of the clean and adversarial halves, each mixed on its own); the
hooks are removed when the block ends, also on an exception.  Mixing the ``"input"`` stage (the
normalised input) equals mixing the [0, 1] images first, since normalisation is affine per
channel; :func:`Mix.apply` on the images is what mixup does.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .randomness import beta, permutation


class MixVariant(str, enum.Enum):
    """How lambdas and partners are drawn (see the module docstring)."""

    BATCH = "batch"
    PER_SAMPLE = "per_sample"


@dataclass(frozen=True)
class MixedTargets:
    """Targets of a mixed batch: row i is ``lam_i onehot(y_a_i) + (1 - lam_i) onehot(y_b_i)``.
    ``lam`` is a scalar tensor (one lambda per batch) or shape ``(B,)``."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    num_classes: int

    @classmethod
    def plain(cls, y: torch.Tensor, num_classes: int) -> "MixedTargets":
        """Unmixed labels (lambda 1)."""
        return cls(y, y, torch.ones((), device=y.device), num_classes)

    def soft(self) -> torch.Tensor:
        """The ``(B, C)`` mixed one-hot target, float32."""
        lam = self.lam.float().reshape(-1, 1) if self.lam.dim() else self.lam.float()
        a = F.one_hot(self.y_a, self.num_classes).float()
        b = F.one_hot(self.y_b, self.num_classes).float()
        return lam * a + (1 - lam) * b


@dataclass(frozen=True)
class Mix:
    """Row i of the mixed batch is ``lam_i * h[first_i] + (1 - lam_i) * h[second_i]``;
    ``first`` ``None`` is the identity (the ``batch`` variant), ``lam`` a scalar or ``(B,)``."""

    lam: torch.Tensor
    first: Optional[torch.Tensor]
    second: torch.Tensor

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The mixed batch of ``h`` (inputs or a hidden stage, any shape ``(B, ...)``)."""
        if h.shape[0] != self.second.numel():
            raise ValueError(f"mix drawn for {self.second.numel()} rows applied to a batch of "
                             f"{h.shape[0]}")
        lam = self.lam.to(device=h.device, dtype=h.dtype)
        if lam.dim():
            lam = lam.view(-1, *([1] * (h.dim() - 1)))
        a = h if self.first is None else h[self.first]
        return lam * a + (1 - lam) * h[self.second]

    def targets(self, y: torch.Tensor, num_classes: int) -> MixedTargets:
        y_a = y if self.first is None else y[self.first]
        return MixedTargets(y_a, y[self.second], self.lam, num_classes)

    def mean_lambda(self) -> float:
        return float(self.lam.float().mean())


def _draw_batch(n: int, alpha: float, generator: torch.Generator, device) -> Mix:
    lam = beta(alpha, alpha, generator, device=device)          # the codes draw lambda first
    return Mix(lam, None, permutation(n, generator, device))


def _draw_per_sample(n: int, alpha: float, generator: torch.Generator, device) -> Mix:
    first = permutation(n, generator, device)                   # rp1, rp2, then the lambdas
    second = permutation(n, generator, device)
    return Mix(beta(alpha, alpha, generator, size=n, device=device), first, second)


#: ``variant`` -> ``(rows, alpha, generator, device) -> Mix``.
VARIANTS: Dict[MixVariant, Callable[..., Mix]] = {
    MixVariant.BATCH: _draw_batch, MixVariant.PER_SAMPLE: _draw_per_sample}


def draw_mix(n: int, alpha: float, variant: MixVariant, generator: torch.Generator,
             device: Optional[torch.device] = None) -> Optional[Mix]:
    """A mix of ``n`` rows drawn from ``generator``; ``None`` (nothing drawn) when alpha is 0."""
    if alpha == 0:
        return None
    return VARIANTS[MixVariant(variant)](int(n), float(alpha), generator, device)


def mix_targets(mix: Optional[Mix], y: torch.Tensor, num_classes: int) -> MixedTargets:
    return MixedTargets.plain(y, num_classes) if mix is None else mix.targets(y, num_classes)


def mix_inputs(mix: Optional[Mix], x: torch.Tensor) -> torch.Tensor:
    return x if mix is None else mix.apply(x)


def check_variant(variant: str, field: str = "variant") -> MixVariant:
    try:
        return MixVariant(variant)
    except ValueError:
        raise ValueError(f"method_args.{field}: unknown mixing variant {variant!r}; known: "
                         f"{[v.value for v in MixVariant]}") from None


def check_alpha(alpha: float, field: str = "alpha") -> float:
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"method_args.{field} must be >= 0 (0 = no mixing); got {alpha!r}")
    return alpha


# ------------------------------------------------------------------------------------- losses

def mixed_ce(logits: torch.Tensor, t: MixedTargets) -> torch.Tensor:
    """``lam CE(out, y_a) + (1 - lam) CE(out, y_b)`` (mixup-cifar10 ``mixup_criterion``)."""
    if t.lam.dim() == 0:
        lam = t.lam.to(logits.device)
        return lam * F.cross_entropy(logits, t.y_a) + (1 - lam) * F.cross_entropy(logits, t.y_b)
    lam = t.lam.to(logits.device)
    ce_a = F.cross_entropy(logits, t.y_a, reduction="none")
    ce_b = F.cross_entropy(logits, t.y_b, reduction="none")
    return (lam * ce_a + (1 - lam) * ce_b).mean()


def soft_ce(logits: torch.Tensor, t: MixedTargets) -> torch.Tensor:
    """Cross-entropy against the mixed one-hot target (Mixup-Inference ``soft_cross_entropy``),
    in float32."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(t.soft() * logp).sum(dim=1).mean()


def bce_softmax(logits: torch.Tensor, t: MixedTargets) -> torch.Tensor:
    """``nn.BCELoss()(softmax(logits), target)`` (manifold_mixup ``main.py``), in float32."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.binary_cross_entropy(F.softmax(logits.float(), dim=1), t.soft())


#: ``loss`` -> ``(logits, MixedTargets) -> scalar``.
LOSSES: Dict[str, Callable[[torch.Tensor, MixedTargets], torch.Tensor]] = {
    "ce": mixed_ce, "soft_ce": soft_ce, "bce_softmax": bce_softmax}


def check_loss(name: str, field: str = "criterion") -> str:
    if name not in LOSSES:
        raise ValueError(f"method_args.{field}: unknown mixing loss {name!r}; "
                         f"known: {sorted(LOSSES)}")
    return name


# ------------------------------------------------------------------------------ stage mixing

@dataclass(frozen=True)
class StageMix:
    """Mix the output of stage ``stage`` with ``mix``, on rows ``start .. start + rows`` of the
    batch (``rows`` ``None``: from ``start`` to the end of the batch)."""

    stage: str
    mix: Mix
    start: int = 0
    rows: Optional[int] = None


def check_stages(stages: Sequence[str], field: str = "stages") -> List[str]:
    """The eligible stages as a list of distinct names (checked against a model in
    :func:`check_model_stages`)."""
    if isinstance(stages, str) or not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"method_args.{field} must be a non-empty list of stage names; "
                         f"got {stages!r}")
    names = list(stages)
    if not all(isinstance(s, str) and s for s in names) or len(set(names)) != len(names):
        raise ValueError(f"method_args.{field} must list distinct stage names; got {stages!r}")
    return names


def check_model_stages(model: nn.Module, stages: Sequence[str], field: str = "stages") -> None:
    """A ``ValueError`` naming the field if ``model`` does not declare every stage in ``stages``."""
    declared = model.stage_names() if hasattr(model, "stage_names") else []
    missing = [s for s in stages if s not in declared]
    if missing:
        raise ValueError(f"method_args.{field}: the model declares no stage {missing}; "
                         f"its stages: {declared}")


def _mix_rows(h: torch.Tensor, plans: Sequence[StageMix]) -> torch.Tensor:
    if len(plans) == 1 and plans[0].rows is None:
        return plans[0].mix.apply(h)
    pieces, at = [], 0
    for plan in sorted(plans, key=lambda p: p.start):
        end = plan.start + (h.shape[0] - plan.start if plan.rows is None else plan.rows)
        if plan.start < at or end > h.shape[0]:
            raise ValueError(f"stage mixes overlap or leave the batch of {h.shape[0]} rows: "
                             f"{[(p.start, p.rows) for p in plans]}")
        pieces += [h[at:plan.start], plan.mix.apply(h[plan.start:end])]
        at = end
    pieces.append(h[at:])
    return torch.cat(pieces)


@contextlib.contextmanager
def mixed_at(model: nn.Module, plans: Sequence[StageMix]) -> Iterator[None]:
    """Inside the block, every forward of ``model`` replaces each planned stage's output by its
    mix (see the module docstring); the hooks are removed on leaving, exception or not."""
    by_stage: Dict[str, List[StageMix]] = {}
    for plan in plans:
        by_stage.setdefault(plan.stage, []).append(plan)
    handles = []
    try:
        for stage, group in by_stage.items():
            def hook(module, inputs, output, group=tuple(group)):
                return _mix_rows(output, group)
            handles.append(model.stage_module(stage).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def draw_stage(stages: Sequence[str], generator: torch.Generator) -> str:
    """One of ``stages``, uniformly (manifold_mixup ``random.randint(0, 2)`` over {0, 1, 2})."""
    return stages[int(torch.randint(len(stages), (), generator=generator))]
