"""Batch-in-Batch sample-selection rules (spec section 4.4) as pure functions on masks.

Batch-in-Batch, Wu et al., arXiv:2406.04070; official code Yinting-Wu/Batch-in-Batch @98d9c448,
``defenses/attacks/BB_single.py`` L8-112 (identical rules in ``BB.py``).  Rows are copy-major:
copy j of sample b is row ``j * B + b``.  Every rule returns a boolean mask over the rows of the
pool it was given, so the selected set keeps the code's (copy-major) order.

========  ==========  ======================================================================
name      code        rule
========  ==========  ======================================================================
``gs``    ``C_type``  every misclassified adversarial copy (L35-42); 0..mB samples
``cp``    ``G_type``  exactly one copy per sample (L81-96): among its misclassified copies the
                      one with the largest Linf radius (code) or the smallest (paper per a
                      secondary source, ``cp_radius_rule='min'``); if no copy is misclassified,
                      the copy with the largest radius (both rules); ties broken uniformly at
                      random (the code's ``argsort(...)[-1]`` breaks them arbitrarily)
``bg``    ``B_type``  pool = the mB adversarial copies followed by the B clean originals (L25-34);
                      every misclassified member of the pool; 0..(m+1)B samples
``none``  ``D_type``  all mB adversarial copies, no selection forward (L53-54)
========  ==========  ======================================================================
"""
from __future__ import annotations

import enum
from typing import Optional

import torch

#: radii closer than this (in [0, 1] pixel units) count as tied for CP.  Copies that reach the
#: same nominal Linf radius differ only by float rounding of ``clamp(x + delta) - x``.
CP_TIE_ATOL = 1e-6


class Selection(str, enum.Enum):
    GS = "gs"      # greedy selection, C_type
    CP = "cp"      # checkpoint, G_type
    BG = "bg"      # adversarial + clean pool, B_type
    NONE = "none"  # D_type


class RadiusRule(str, enum.Enum):
    MAX = "max"    # released code (argsort(radii)[-1])
    MIN = "min"    # paper, per the secondary description


def misclassified(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows whose arg-max prediction differs from the label, shape (N,)."""
    return logits.argmax(dim=1) != labels


def select_cp(wrong: torch.Tensor, radii: torch.Tensor, rule: RadiusRule,
              generator: Optional[torch.Generator] = None,
              atol: float = CP_TIE_ATOL) -> torch.Tensor:
    """CP (``G_type``): exactly one copy per original sample.

    ``wrong`` and ``radii`` have shape (m, B) (copy j of sample b at [j, b]).  Returns a bool mask
    of shape (m, B) with exactly one True per column.  Candidates of column b are its misclassified
    copies if there are any (picked by ``rule``), otherwise all its copies (picked by the largest
    radius, as the code does for both rules).  Ties within ``atol`` go to a uniformly random
    candidate, drawn with ``generator``.
    """
    rule = RadiusRule(rule)
    any_wrong = wrong.any(dim=0, keepdim=True)                       # (1, B)
    candidate = torch.where(any_wrong, wrong, torch.ones_like(wrong))
    use_min = any_wrong if rule is RadiusRule.MIN else torch.zeros_like(any_wrong)
    score = torch.where(use_min, -radii, radii)
    score = score.masked_fill(~candidate, -float("inf"))
    best = score.amax(dim=0, keepdim=True)
    tied = candidate & (score >= best - atol)
    u = torch.rand(wrong.shape, generator=generator, device="cpu").to(wrong.device)
    pick = u.masked_fill(~tied, -1.0).argmax(dim=0)                  # (B,)
    mask = torch.zeros_like(wrong)
    mask[pick, torch.arange(wrong.shape[1], device=wrong.device)] = True
    return mask
