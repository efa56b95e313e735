"""The seed band of a reproduced accuracy and its verdict against a published number.  No torch.

All numbers in points.  Per seed, an accuracy p on N examples has the binomial variance
p(1-p)/N.  Over n seeds with mean m and seed standard deviation s, the half-width is
``t(0.975, n-1) * sqrt(s^2/n + mean_binomial_var/n)`` for n >= 2, and
``1.96 * sqrt(p(1-p)/N)`` for n = 1 (rule :data:`ONE_SEED`).  The reproduced 95% interval is
m +- half-width; the verdict (:func:`verdict`) is ``within band`` if |m - published| <=
half-width, else ``below`` or ``above``.  A published bound (``value_qualifier`` ``<``, ``<=``,
``up to``: an upper bound; ``>``, ``>=``: a lower one; :data:`QUALIFIER_SIDES`) is met when the
band reaches it.  t and z come from :mod:`scipy.stats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

#: The 0.975 quantile of the standard normal (the one-seed band).
Z_975 = float(stats.norm.ppf(0.975))
#: The band rule (and marker) of a band from one seed.
ONE_SEED = "1 seed: binomial only"
#: value_qualifier -> which side of the band must reach the published bound.
QUALIFIER_SIDES = {"<": "upper", "<=": "upper", "up to": "upper", ">": "lower", ">=": "lower"}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_975: df must be >= 1, got {df}")
    return float(stats.t.ppf(0.975, df))


@dataclass(frozen=True)
class Band:
    """Mean over seeds and the 95% half-width (both in points), the rule that made it."""
    n: int
    mean: float
    half_width: float
    rule: str

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def band(accs: Sequence[float], totals: Sequence[int]) -> Band:
    """The band of per-seed accuracies ``accs`` (fractions) on ``totals`` examples (module
    docstring)."""
    if not accs or len(accs) != len(totals):
        raise ValueError(f"band: {len(accs)} accuracies for {len(totals)} totals")
    n = len(accs)
    var = [p * (1 - p) / N for p, N in zip(accs, totals)]
    m = sum(accs) / n
    if n == 1:
        return Band(1, 100 * m, 100 * Z_975 * math.sqrt(var[0]), ONE_SEED)
    s2 = sum((p - m) ** 2 for p in accs) / (n - 1)
    hw = t_975(n - 1) * math.sqrt(s2 / n + (sum(var) / n) / n)
    return Band(n, 100 * m, 100 * hw, f"t(0.975, {n - 1})")


def verdict(b: Band, published: float, qualifier: str = "") -> str:
    """``within band`` / ``below`` / ``above`` for the band against a published value (points),
    a bound when ``qualifier`` is one of :data:`QUALIFIER_SIDES`."""
    side = QUALIFIER_SIDES.get((qualifier or "").strip().lower())
    tol = 1e-9
    if side == "upper":
        return "within band" if b.low <= published + tol else "above"
    if side == "lower":
        return "within band" if b.high >= published - tol else "below"
    delta = b.mean - published
    if abs(delta) <= b.half_width + tol:
        return "within band"
    return "below" if delta < 0 else "above"
