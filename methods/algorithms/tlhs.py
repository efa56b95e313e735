"""Tuned Latin hypercube sampling (tLHS) of BB's initial perturbations (spec section 4.2).

Batch-in-Batch, Wu et al., arXiv:2406.04070; official code Yinting-Wu/Batch-in-Batch @98d9c448,
``defenses/attacks/BB_single.py::LHD`` L175-203 (the same function is in ``BB.py`` L223-251).

For m copies of a batch and radius r (single-step BB: r = 2 eps; multi-step: r = eps):

* the m levels are the interior points of m + 1 equal intervals of [-r, r]:
  ``levels_i = -r + i * 2r / (m + 1)``, i = 1..m, so ``max |level| = r (m - 1) / (m + 1) < r``;
* for odd m the middle level (0) is replaced by the absolute value 1e-4 (L196);
* every pixel dimension d gets its own uniformly random permutation of the m levels (L198-201),
  so for each d the m copies take each level exactly once (a Latin hypercube over copies);
* every sample of copy j receives copy j's pattern (L202: ``repeat(1, bat_size)``);
* m == 1: a plain i.i.d. U(-r, r) draw per sample (L177-178).

Departure: the official code tests ``level == 0`` in float32, which for some (eps, m) misses the
middle level (e.g. eps = 6/255, m = 5 leaves +1.9e-9 instead of 1e-4); we always use 1e-4, as the
spec states.  Both are far below a pixel step (1/255).  Randomness comes from a torch generator
(the code uses numpy's global RNG), so runs are reproducible and resumable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

MIDDLE_LEVEL = 1e-4  # absolute, in [0, 1] pixel units (official L196)


def tlhs_levels(m: int, r: float) -> torch.Tensor:
    """The m tLHS levels in increasing order, float64, shape (m,)."""
    if m < 2:
        raise ValueError(f"tLHS levels need m >= 2 copies, got m={m}")
    i = torch.arange(1, m + 1, dtype=torch.float64)
    levels = -r + i * (2.0 * r / (m + 1))
    if m % 2 == 1:
        levels[(m - 1) // 2] = MIDDLE_LEVEL
    return levels


def tlhs_pattern(m: int, sample_shape: Sequence[int], r: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One noise image per copy, shape (m, *sample_shape), on the CPU in float64.

    Column d of the flattened pattern is an independent uniformly random permutation of the m
    levels (the argsort of i.i.d. uniforms), which is the official per-dimension shuffle.
    """
    d = 1
    for s in sample_shape:
        d *= int(s)
    levels = tlhs_levels(m, r)
    perm = torch.argsort(torch.rand((m, d), generator=generator, dtype=torch.float64), dim=0)
    return levels[perm].view(m, *sample_shape)


def expand_pattern(pattern: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Noise for the m stacked copies: row j * B + b gets copy j's pattern; shape (m B, ...)."""
    return pattern.repeat_interleave(batch_size, dim=0)
