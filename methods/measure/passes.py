"""Count forward and backward sample-passes through a model, by phase.

A *sample-pass* is one example going through the network once: a forward pass on a batch of B
examples is B forward sample-passes, and back-propagating through its logits is B backward
sample-passes.  The counter is attached with hooks (the model and its state_dict are untouched),
so what a method spends is measured rather than assumed:

    counter = PassCounter(model)
    with counter.phase("attack"):
        ...                       # every forward/backward here is booked to "attack"
    counter.totals()              # {"attack": {"forward": ..., "backward": ...}, ...}

A backward sample-pass is booked when the gradient reaches the model's output, so
``torch.autograd.grad`` w.r.t. inputs and ``loss.backward()`` are both counted, and forwards
under ``torch.no_grad()`` count as forward only.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterator

import torch
from torch import nn


class PassCounter:
    def __init__(self, model: nn.Module, default_phase: str = "train") -> None:
        self._phase = default_phase
        self._counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        n = int(output.shape[0])
        phase = self._phase
        self._counts[phase]["forward"] += n
        if output.requires_grad:
            def on_backward(grad: torch.Tensor, phase: str = phase, n: int = n) -> None:
                self._counts[phase]["backward"] += n
            output.register_hook(on_backward)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def totals(self) -> Dict[str, Dict[str, int]]:
        return {k: dict(v) for k, v in self._counts.items()}

    def reset(self) -> None:
        self._counts.clear()

    def detach(self) -> None:
        self._handle.remove()


def sum_passes(totals: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """Forward and backward sample-passes summed over phases."""
    return {
        "forward": sum(v["forward"] for v in totals.values()),
        "backward": sum(v["backward"] for v in totals.values()),
    }
