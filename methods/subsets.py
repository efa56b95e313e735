"""Seeded, class-stratified subsets: the evaluation subsets (AutoAttack) and the monitor batch."""
from __future__ import annotations

import numpy as np
import torch

from .data.splits import proportional_counts, stratified_take
from .runtime import cpu_generator


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded, class-stratified draw of ``n`` indices into ``y`` (sorted, int64).

    Each class gets floor(n * share) examples; the remainder goes to the classes with the
    largest fractional parts (ties by class index) -- :func:`methods.data.splits.proportional_counts`.
    The members of each class are drawn by :func:`methods.data.splits.stratified_take` with a
    torch generator seeded by ``seed``.  ``n >= len(y)`` returns everything.
    """
    if n >= len(y):
        return torch.arange(len(y))
    labels = y.detach().cpu().numpy()
    per_class = proportional_counts(np.bincount(labels), n)
    chosen, _ = stratified_take(labels, per_class, cpu_generator(seed))
    return torch.from_numpy(chosen)
