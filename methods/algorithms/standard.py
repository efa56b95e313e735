"""Standard (clean) training: cross-entropy on the unperturbed batch."""
from __future__ import annotations

import torch.nn.functional as F

from ..registry import METHODS
from .base import Method


@METHODS.register("standard")
class StandardTraining(Method):
    name = "standard"
    paper = "clean empirical risk minimisation (no adversary)"

    def loss(self, model, x, y, ctx):
        return F.cross_entropy(model(x), y)
