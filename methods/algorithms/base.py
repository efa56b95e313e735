"""The one seam between a training method and the shared trainer.

A method is a small class registered in :data:`methods.registry.METHODS`.  The trainer owns the
loop, the optimizer and schedule, checkpoints, AMP, measurement and logging; a method supplies only

* ``loss(model, x, y, ctx)``: the loss to back-propagate for one minibatch, or ``None`` to skip
  the optimizer step (the LR schedule still advances, as in the BB code when nothing is selected);
* optionally ``start_epoch(ctx)`` for per-epoch state (BB regenerates its tLHS noise there), and
  ``state_dict`` / ``load_state_dict`` for state that must survive a resume.

``x`` is a float batch in [0, 1] on ``ctx.device``; ``y`` holds integer labels.  The model is in
train mode when ``loss`` is called and must be back in train mode when it returns;
:func:`attack_mode` switches it for attack generation and restores it.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from ..measure.passes import PassCounter
from ..threat import ThreatModel


class ModelMode(str, enum.Enum):
    """The model's mode while a training attack (and any selection pass) is generated.

    TRAIN: BatchNorm uses (and updates) batch statistics, dropout is on; N-FGSM's and locuslab's
    official codes attack this way.  EVAL: running statistics, no dropout; BB's code attacks this
    way through torchattacks (spec section 2.3).
    """

    TRAIN = "train"
    EVAL = "eval"


@contextlib.contextmanager
def attack_mode(model: nn.Module, mode: ModelMode) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the duration of the block, then restore its previous mode."""
    was_training = model.training
    model.train(mode is ModelMode.TRAIN)
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class StepContext:
    """What a method may know about where it is in training."""

    epoch: int                      # 0-based
    step_in_epoch: int              # 0-based
    steps_per_epoch: int
    epochs: int
    device: torch.device
    counter: PassCounter            # book passes with ``ctx.counter.phase("attack")``
    generator: torch.Generator      # CPU generator for the method's own randomness (checkpointed)
    stats: Dict[str, float] = field(default_factory=dict)  # per-step scalars the method reports

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.global_step / max(1, self.epochs * self.steps_per_epoch)


class Method:
    """Base class: subclasses set ``name`` and ``paper`` and implement :meth:`loss`.

    The trainer builds a method as ``METHODS.get(name)(threat=..., **method_args)`` where
    ``threat`` is the training threat model and ``method_args`` come from the recipe.  Subclasses
    take their parameters as keyword arguments whose defaults are the official defaults, so an
    unknown parameter is a ``TypeError`` naming it, and :meth:`describe` reports them all.
    """

    name: str = ""
    paper: str = ""

    def __init__(self, *, threat: ThreatModel) -> None:
        self.threat = threat

    def start_epoch(self, model: nn.Module, ctx: StepContext) -> None:
        """Called once before the first batch of every epoch (also after a resume)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: StepContext) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """The method's resolved parameters, recorded in every result file."""
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "threat"}
        params = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()}
        return {"name": self.name, "paper": self.paper, "threat": {
            "norm": self.threat.norm.value, "eps": self.threat.eps}, **params}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
