"""Seeded draws for the mixing methods, from the method's checkpointed generator.

``torch.distributions.Beta`` takes no generator, so a mixup-style method that used it would draw
from torch's global RNG and could not resume bit for bit.  Here every draw comes from the CPU
generator the trainer checkpoints (``ctx.generator``): Beta(a, b) by inverting its CDF at a
uniform draw (``scipy.special.betaincinv``, exact up to float64 rounding), permutations with
``torch.randperm``.  Results are created on the CPU and moved to ``device``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy.special import betaincinv

Size = Union[int, Sequence[int]]


def beta(a: float, b: float, generator: torch.Generator, size: Size = (),
         device: Optional[torch.device] = None) -> torch.Tensor:
    """Samples of Beta(a, b) (float32), drawn from ``generator``; ``size=()`` gives a scalar
    tensor.  mixup's lambda is ``beta(alpha, alpha, g)``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta: a and b must be > 0, got {a!r}, {b!r}")
    shape = (size,) if isinstance(size, int) else tuple(size)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    draws = torch.from_numpy(np.asarray(betaincinv(float(a), float(b), u.numpy()), dtype=np.float64))
    return draws.to(dtype=torch.float32, device=device or "cpu")


def permutation(n: int, generator: torch.Generator,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` drawn from ``generator`` (mixup's partner index)."""
    return torch.randperm(int(n), generator=generator).to(device or "cpu")
