"""Count forward and backward sample-passes through a model, by phase (and by batch size).

A *sample-pass* is one example going through the network once: a forward pass on a batch of B
examples is B forward sample-passes, and back-propagating through it is B backward sample-passes.
The counter is attached with hooks (the model and its state_dict are untouched), so what a method
spends is measured rather than assumed:

    counter = PassCounter(model)
    with counter.phase("attack"):
        ...                       # every forward/backward here is booked to "attack"
    counter.totals()              # {"attack": {"forward": ..., "backward": ...}, ...}
    counter.totals_by_rows()      # {"attack": {B: {"forward": ..., "backward": ...}}, ...}

Where it hooks.  For a model with stages (a :class:`~methods.models.core.Backbone`, e.g. every
:class:`~methods.models.core.NormalizedModel`) the counter hooks the module of the
``"features"`` stage, whose output every forward through the network body computes exactly once,
whichever entry point is used: ``model(x)``, ``model.head(model.forward_features(x))`` (Selective
AT's grad_cosine scores) or ``model.forward_with_features(x)``; module hooks also fire under
``torch.func.functional_call``.  A forward books ``rows`` forward sample-passes, ``rows`` being
the batch size of the features tensor; if that tensor requires grad, a tensor hook on it books
``rows`` backward sample-passes each time a gradient reaches it, so ``loss.backward()`` and
``torch.autograd.grad`` w.r.t. the input both count, and forwards under ``torch.no_grad()`` count
as forward only.  A model without ``stage_module`` (any other ``nn.Module``, e.g. a test wrapper)
is counted the same way at its own forward output.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterator

import torch
from torch import nn

from ..models.core import FEATURES_STAGE

KINDS = ("forward", "backward")


def counted_module(model: nn.Module) -> nn.Module:
    """The module whose output the counter hooks: the ``"features"`` stage, else the model."""
    stage_module = getattr(model, "stage_module", None)
    return stage_module(FEATURES_STAGE) if callable(stage_module) else model


class PassCounter:
    """Hooks ``model`` (see the module docstring) and books sample-passes to the current phase."""

    def __init__(self, model: nn.Module, default_phase: str = "train") -> None:
        self._phase = default_phase
        # phase -> rows (batch size of the forward) -> {"forward": n, "backward": n}
        self._counts: Dict[str, Dict[int, Dict[str, int]]] = defaultdict(dict)
        self._handle = counted_module(model).register_forward_hook(self._on_forward)

    def _book(self, phase: str, rows: int, kind: str) -> None:
        by_rows = self._counts[phase].setdefault(rows, dict.fromkeys(KINDS, 0))
        by_rows[kind] += rows

    def _on_forward(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        rows, phase = int(output.shape[0]), self._phase
        self._book(phase, rows, "forward")
        if output.requires_grad:
            output.register_hook(lambda grad: self._book(phase, rows, "backward"))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Book the passes inside the block to phase ``name`` (restores the previous phase)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def totals(self) -> Dict[str, Dict[str, int]]:
        """``{phase: {"forward": n, "backward": n}}`` sample-passes since the last reset."""
        return {phase: {k: sum(c[k] for c in by_rows.values()) for k in KINDS}
                for phase, by_rows in self._counts.items()}

    def totals_by_rows(self) -> Dict[str, Dict[int, Dict[str, int]]]:
        """``{phase: {rows: {"forward": n, "backward": n}}}``: the sample-passes of forwards on
        batches of ``rows`` examples (and of the backwards through them), rows ascending."""
        return {phase: {rows: dict(by_rows[rows]) for rows in sorted(by_rows)}
                for phase, by_rows in self._counts.items()}

    def reset(self) -> None:
        """Forget every count (both views)."""
        self._counts.clear()

    def detach(self) -> None:
        """Remove the forward hook; tensor hooks already placed still book their backwards."""
        self._handle.remove()


def sum_passes(totals: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """Forward and backward sample-passes summed over phases."""
    return {
        "forward": sum(v["forward"] for v in totals.values()),
        "backward": sum(v["backward"] for v in totals.values()),
    }
