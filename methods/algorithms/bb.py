"""Batch-in-Batch (BB), Wu et al., "Batch-in-Batch: a new adversarial training framework for
initial perturbation and sample selection", arXiv:2406.04070 (Complex & Intelligent Systems 2025);
official code Yinting-Wu/Batch-in-Batch @98d9c448 (``defenses/attacks/BB_single.py``,
``defenses/attacks/BB.py``, ``defenses/trainers/BB_single_trainer.py``, ``BB_adv_trainer.py``).

Per step (spec sections 4.3-4.5), for a batch x in [0, 1]^{B x ...} with labels y:

1. ``X = cat([x] * m)``, ``Y = cat([y] * m)``; copy j is rows j*B..(j+1)*B (``dup``, L204-209).
2. Initial noise of radius r (``init_noise``, L210-221; ``BB.py`` L165-173):
   ``init='tlhs'``: the tLHS pattern of :mod:`.tlhs`, drawn once per epoch at the epoch's first
   step and reused by every batch of the epoch (``epoch_errand``, trainer L72-80);
   ``init='random'``: i.i.d. U(-r, r), drawn fresh every batch.  ``X + noise`` is clamped to [0, 1].
3. The attack on all m*B rows at once, one batched forward+backward per step, in ``attack_mode``
   (eval by default: the code runs through ``torchattacks.Attack.__call__``, spec 2.3):
   ``variant='single'`` (``grad_attack``, L222-228): one sign step of alpha = eps from the noisy
   point, r = 2 eps, image clamp but NO eps-ball projection, so ||delta||_inf can reach
   r (m-1)/(m+1) + eps (tLHS) or r + eps (random);
   ``variant='multi'`` (``BB.py`` L174-215): ``steps`` = 10 sign steps of alpha = eps/4, r = eps,
   projection onto the eps-ball and image clamp after each step.
4. Selection (:mod:`.selection`) with a no-grad forward in the same mode as the attack.
5. Mean CE over the selected set, with the model back in train mode (trainer ``loss_and_back``).
   An empty selection returns ``None``: no optimizer step, the schedule still advances.

``clean_warmup_epochs``: the code trains on clean data while ``epochi <= clean_warmup`` (1-based
epochs, default 0 = never); here, epochs ``ctx.epoch < clean_warmup_epochs``.

With ``m=1, init='random', selection='none', variant='single'`` a step is exactly N-FGSM
(:mod:`.nfgsm`, k = 2, alpha = eps) in the same attack mode: the same generator draw, the same
arithmetic (spec 4.8 pitfall 1).

Departures (all deliberate; none changes the rule): randomness comes from ``ctx.generator``
(the code mixes numpy's and torch's global RNGs); CP ties are broken uniformly at random (code:
arbitrary ``argsort`` order), with ``cp_radius_rule`` choosing the code's largest radius or the
paper's smallest; the middle tLHS level is always 1e-4 for odd m (see :mod:`.tlhs`); a tLHS
pattern for m >= 2 is stored per copy, so it also fits a smaller last batch (the single-step code
regenerates on a shape change, the multi-step code slices its tensor); for m == 1, or
``init='random'`` with ``regenerate='epoch'``, the stored per-sample noise is redrawn when the
batch shape changes, as in ``BB_single``.  The attack's input gradient is that of the summed CE
(the code: mean), which has the same sign.  Only the Linf threat model is supported (the code's
only one).
"""
from __future__ import annotations

import enum
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F

from ..attacks import input_gradient
from ..registry import METHODS
from ..threat import Norm, clamp_to_image
from .base import Method, ModelMode, attack_mode
from .selection import RadiusRule, Selection, misclassified, select_cp
from .tlhs import expand_pattern, tlhs_pattern


class Variant(str, enum.Enum):
    SINGLE = "single"   # BB_single: N-FGSM-based one step
    MULTI = "multi"     # BB: PGD-based


class Init(str, enum.Enum):
    TLHS = "tlhs"       # init_type='LHD'
    RANDOM = "random"   # init_type='random'


class Regenerate(str, enum.Enum):
    EPOCH = "epoch"
    BATCH = "batch"


E = TypeVar("E", bound=enum.Enum)


def _choice(field: str, value: Any, kind: Type[E]) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"bb: {field} must be one of {allowed}, got {value!r}") from None


@METHODS.register("bb")
class BatchInBatch(Method):
    """Batch-in-Batch adversarial training; see the module docstring for the exact step.

    Defaults follow the code (``train.py`` example, ``magnitude_eval.py``) and the spec's primary
    run: m = 5 copies, single-step, tLHS regenerated once per epoch, eval-mode attack.  ``steps``,
    ``alpha`` (absolute, [0, 1] units) and ``radius_ratio`` (r / eps) default per variant to
    1 / eps / 2 (single) and 10 / eps/4 / 1 (multi).  ``regenerate`` defaults to ``'epoch'`` for
    tLHS and ``'batch'`` for random noise, as in the code.  ``selection`` has no default in the
    code among the paper's strategies (argparse: ``'A'``); recipes should set it.
    """

    name = "bb"
    paper = ("Wu et al. Batch-in-Batch: a new adversarial training framework for initial "
             "perturbation and sample selection. arXiv:2406.04070")

    def __init__(self, *, threat, m: int = 5, variant: str = "single", init: str = "tlhs",
                 regenerate: Optional[str] = None, selection: str = "gs",
                 cp_radius_rule: str = "max", attack_mode: str = "eval",
                 steps: Optional[int] = None, alpha: Optional[float] = None,
                 radius_ratio: Optional[float] = None, clean_warmup_epochs: int = 0) -> None:
        super().__init__(threat=threat)
        if threat.norm is not Norm.LINF:
            raise ValueError(f"bb: threat.norm must be 'linf' (tLHS is per pixel), "
                             f"got {threat.norm.value!r}")
        if int(m) < 1:
            raise ValueError(f"bb: m must be >= 1, got {m!r}")
        self.m = int(m)
        self.variant = _choice("variant", variant, Variant)
        self.init = _choice("init", init, Init)
        default_regen = Regenerate.EPOCH if self.init is Init.TLHS else Regenerate.BATCH
        self.regenerate = (default_regen if regenerate is None
                           else _choice("regenerate", regenerate, Regenerate))
        self.selection = _choice("selection", selection, Selection)
        self.cp_radius_rule = _choice("cp_radius_rule", cp_radius_rule, RadiusRule)
        self.attack_mode = _choice("attack_mode", attack_mode, ModelMode)
        single = self.variant is Variant.SINGLE
        eps = threat.eps
        self.steps = int((1 if single else 10) if steps is None else steps)
        if single and self.steps != 1:
            raise ValueError(f"bb: steps must be 1 for variant='single', got {steps!r}")
        if self.steps < 1:
            raise ValueError(f"bb: steps must be >= 1, got {steps!r}")
        self.alpha = float((eps if single else eps / 4) if alpha is None else alpha)
        self.radius_ratio = float((2.0 if single else 1.0) if radius_ratio is None
                                  else radius_ratio)
        self.radius = self.radius_ratio * eps
        self.project = not single
        self.clean_warmup_epochs = int(clean_warmup_epochs)
        # Noise reused across the batches of an epoch: a per-copy pattern (tLHS, m >= 2) or a
        # full per-sample tensor (m == 1, or random noise kept for an epoch).
        self._noise: Optional[torch.Tensor] = None
        self._noise_epoch: Optional[int] = None

    # ----------------------------------------------------------------------------- noise
    @property
    def _per_copy_pattern(self) -> bool:
        return self.init is Init.TLHS and self.m >= 2

    def _draw(self, X: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self._per_copy_pattern:
            return tlhs_pattern(self.m, X.shape[1:], self.radius, generator)
        # m == 1 tLHS (LHD L177-178) and random init: i.i.d. U(-r, r) per element, drawn the
        # way N-FGSM draws its noise so that BB(m=1, random) is N-FGSM.
        return self.threat.random_start(X, radius=self.radius, generator=generator)

    def _fits(self, X: torch.Tensor) -> bool:
        if self._noise is None:
            return False
        if self._per_copy_pattern:
            return tuple(self._noise.shape) == (self.m, *X.shape[1:])
        return tuple(self._noise.shape) == tuple(X.shape)

    def initial_noise(self, X: torch.Tensor, ctx) -> Tuple[torch.Tensor, bool]:
        """Noise for the stacked copies ``X`` (shape (m B, ...)) and whether it was redrawn."""
        fresh = (self.regenerate is Regenerate.BATCH or self._noise_epoch != ctx.epoch
                 or not self._fits(X))
        if fresh:
            self._noise = self._draw(X, ctx.generator)
            self._noise_epoch = ctx.epoch
        noise = self._noise
        if self._per_copy_pattern:
            noise = expand_pattern(noise, X.shape[0] // self.m)
        return noise.to(X.device, X.dtype), fresh

    # ----------------------------------------------------------------------------- attack
    def attack(self, model, X: torch.Tensor, Y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Perturbation of the m*B stacked rows: one batched forward+backward per step."""
        delta = clamp_to_image(X, noise)
        for _ in range(self.steps):
            grad = input_gradient(model, X, delta, Y)
            delta = self.threat.ascent(delta, grad, self.alpha)
            if self.project:
                delta = self.threat.project(delta)
            delta = clamp_to_image(X, delta)
        return delta.detach()

    def select(self, model, x: torch.Tensor, y: torch.Tensor, X_adv: torch.Tensor,
               Y: torch.Tensor, delta: torch.Tensor,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """The selected samples and labels (no grad; the model's mode is the caller's)."""
        if self.selection is Selection.NONE:
            return X_adv, Y
        with torch.no_grad():
            if self.selection is Selection.BG:
                pool, labels = torch.cat([X_adv, x]), torch.cat([Y, y])
                keep = misclassified(model(pool), labels)
                return pool[keep], labels[keep]
            wrong = misclassified(model(X_adv), Y)
            if self.selection is Selection.GS:
                keep = wrong
            else:  # CP
                m, B = self.m, x.shape[0]
                radii = self.threat.distance(delta).view(m, B)
                keep = select_cp(wrong.view(m, B), radii, self.cp_radius_rule,
                                 generator).flatten()
        return X_adv[keep], Y[keep]

    # ----------------------------------------------------------------------------- step
    def loss(self, model, x, y, ctx):
        if ctx.epoch < self.clean_warmup_epochs:
            return F.cross_entropy(model(x), y)
        m, B = self.m, x.shape[0]
        X = x.repeat(m, *([1] * (x.dim() - 1)))
        Y = y.repeat(m)
        noise, fresh = self.initial_noise(X, ctx)
        with attack_mode(model, self.attack_mode):
            with ctx.counter.phase("attack"):
                delta = self.attack(model, X, Y, noise)
            X_adv = (X + delta).detach()
            with ctx.counter.phase("selection"):
                S, YS = self.select(model, x, y, X_adv, Y, delta, ctx.generator)
        ctx.stats["bb_selected"] = float(S.shape[0])
        ctx.stats["bb_selected_frac"] = S.shape[0] / float(m * B)
        ctx.stats["bb_noise_redrawn"] = float(fresh)
        if S.shape[0] == 0:
            return None
        return F.cross_entropy(model(S), YS)

    # ----------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        return {"noise": None if self._noise is None else self._noise.detach().cpu(),
                "noise_epoch": self._noise_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._noise = state.get("noise")
        self._noise_epoch = state.get("noise_epoch")
