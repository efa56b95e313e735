"""Seeded, class-stratified subsets: the evaluation subsets (AutoAttack) and the monitor batch."""
from __future__ import annotations

import torch

from .runtime import cpu_generator


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded, class-stratified draw of ``n`` indices into ``y`` (sorted).

    Each class gets floor(n * share) examples; the remainder goes to the classes with the
    largest fractional parts (ties by class index).  ``n >= len(y)`` returns everything.
    """
    if n >= len(y):
        return torch.arange(len(y))
    g = cpu_generator(seed)
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    take = exact.floor().long()
    remainder = n - int(take.sum())
    order = torch.argsort(-(exact - take.double()), stable=True)
    take[order[:remainder]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(y == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(chosen)).values
