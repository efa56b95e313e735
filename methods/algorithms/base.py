"""The one seam between a training method and the shared trainer.

A method is a small class registered in :data:`methods.registry.METHODS`.  The trainer owns the
loop, the optimizer and schedule, checkpoints, AMP, measurement and logging; a method supplies only

* ``loss(model, x, y, ctx)``: the loss to back-propagate for one minibatch, or ``None`` to skip
  the optimizer step (the LR schedule still advances, as in the BB code when nothing is selected);
* optionally ``setup(model, data, ctx)``, called once before any state is loaded: the number of
  classes, the feature dimension, the training class counts and the validation / meta split
  (:class:`MethodData`), for methods that build modules or statistics of their own (put them on
  ``ctx.device`` there, so a resumed state loads onto them);
* optionally ``step(model, x, y, ctx)``, which owns the whole update for methods that need more
  than one backward or a look-ahead (Meta-IADA); the default runs ``loss`` under the run's
  precision and hands it to ``ctx.update`` (zero_grad, backward with loss scaling, optimizer
  step), which is exactly the trainer's path;
* optionally ``start_epoch(ctx)`` for per-epoch state (BB regenerates its tLHS noise there), and
  ``state_dict`` / ``load_state_dict`` for state that must survive a resume.

``x`` is a float batch in [0, 1] on ``ctx.device``; ``y`` holds integer labels.  The model is in
train mode when ``loss`` is called and must be back in train mode when it returns;
:func:`attack_mode` switches it for attack generation and restores it.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..data.splits import Split
from ..measure.passes import PassCounter
from ..runtime import Precision, autocast
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


@dataclass(frozen=True)
class MethodData:
    """What :meth:`Method.setup` is told about the data and the model."""

    num_classes: int
    image_shape: Tuple[int, int, int]     # (C, H, W)
    feature_dim: int                      # width of ``model.forward_features(x)``
    class_counts: torch.Tensor            # training examples per class (after LT / noise variants)
    meta: Optional[Split]                 # the validation / meta split (uint8 images), if any
    device: torch.device


@dataclass(frozen=True)
class SetupContext:
    device: torch.device
    generator: torch.Generator      # the method's checkpointed generator
    epochs: int
    steps_per_epoch: int
    precision: Precision


@dataclass
class StepContext:
    """What a method may know about where it is in training, and how to update."""

    epoch: int                      # 0-based
    step_in_epoch: int              # 0-based
    steps_per_epoch: int
    epochs: int
    device: torch.device
    counter: PassCounter            # book passes with ``ctx.counter.phase("attack")``
    generator: torch.Generator      # CPU generator for the method's own randomness (checkpointed)
    stats: Dict[str, float] = field(default_factory=dict)  # per-step scalars the method reports
    indices: Optional[torch.Tensor] = None   # the batch's positions in the training split, if known
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[torch.amp.GradScaler] = None
    precision: Precision = Precision.FP32

    @property
    def lr(self) -> float:
        """The learning rate this step will use (the schedule advances after the step)."""
        if self.optimizer is None:
            raise RuntimeError("StepContext.lr: no optimizer in this context")
        return float(self.optimizer.param_groups[0]["lr"])

    def autocast(self):
        """The run's mixed precision for forward passes (a no-op in fp32)."""
        return autocast(self.device, self.precision)

    def update(self, loss: torch.Tensor) -> None:
        """The trainer's update: zero_grad, backward (loss-scaled under fp16), optimizer step."""
        if self.optimizer is None:
            raise RuntimeError("StepContext.update: no optimizer in this context")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

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

    def setup(self, model: nn.Module, data: MethodData, ctx: SetupContext) -> None:
        """Called once, after the model is built and before any state is loaded."""

    def start_epoch(self, model: nn.Module, ctx: StepContext) -> None:
        """Called once before the first batch of every epoch (also after a resume)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: StepContext) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: StepContext) -> Optional[torch.Tensor]:
        """One update; returns the loss that was optimised (``None``: no update this step)."""
        with ctx.autocast():
            loss = self.loss(model, x, y, ctx)
        if loss is not None:
            ctx.update(loss)
        return loss

    @classmethod
    def parameters(cls) -> Dict[str, Any]:
        """The declared parameters (keyword arguments of ``__init__``, except ``threat``) and
        their defaults."""
        return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "threat"}

    def describe(self) -> Dict[str, Any]:
        """The method's declared parameters as resolved (recorded in every result file).

        Only what ``__init__`` declares is recorded, read back from the attribute of the same
        name, so internal state never reaches a result file; a parameter that is not stored
        under its own name, or whose value is not JSON, is an error naming it.
        """
        params: Dict[str, Any] = {}
        for name in self.parameters():
            if not hasattr(self, name):
                raise AttributeError(f"method {self.name!r}: parameter {name!r} is not stored as "
                                     f"self.{name}, so describe() cannot record it")
            value = getattr(self, name)
            value = value.value if isinstance(value, enum.Enum) else value
            try:
                json.dumps(value)
            except TypeError:
                raise TypeError(f"method {self.name!r}: parameter {name!r} = {value!r} is not "
                                "JSON-serialisable") from None
            params[name] = value
        return {"name": self.name, "paper": self.paper, "threat": {
            "norm": self.threat.norm.value, "eps": self.threat.eps}, **params}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
