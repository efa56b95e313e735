"""The claims plot of :mod:`methods.plots`: the claims CSV as intervals.  No torch.

* ``claims_intervals`` (:func:`draw_claims_intervals`): the claims CSV (:mod:`methods.claims`,
  read by :func:`methods.plot_data.read_claims`): per test the paired difference a - b in
  points with its 95% interval, zero line, +-margin shaded for equivalence tests, dashed margin
  for at-most tests, colour by verdict (:data:`methods.plots_style.VERDICT_COLORS`), per-seed
  differences as ticks; tests without an interval (not run, too few seeds) as text rows.

Only the standard library is imported at module level.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from .plots_style import CLAIMS_CONFIG, VERDICT_COLORS, Rendered, finish, say_missing

if TYPE_CHECKING:
    from .plot_data import Point


def draw_claims_intervals(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``claims_intervals`` from ``claims_csv`` (``points`` unused; module docstring)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .plot_data import read_claims

    claims, why = read_claims(Path(claims_csv))
    n = max(1, len(claims))
    fig, ax = plt.subplots(figsize=(8.5, min(max(0.28 * n + 1.6, 3.0), 30)))
    fig.suptitle("Claims: paired difference a - b per test (percentage points, 95% t-interval "
                 "over seeds)", fontsize=9.5)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not claims:
        say_missing(ax, f"{why}: run {CLAIMS_CONFIG}, then `python -m methods claims` "
                        "(methods/claims.py)", notes)
    text_x = ax.get_yaxis_transform()
    labels = []
    for i, c in enumerate(claims):
        y = n - 1 - i
        role = "" if str(c.get("role", "test")) in ("test", "nan") else f" ({c['role']})"
        context = "" if str(c["context"]) in ("", "nan") else f" [{c['context']}]"
        unit = " [passes]" if str(c.get("metric")) == "passes" else ""
        label = textwrap.shorten(f"{c['claim_id']}/{c['test_id']}{unit}{role}: {c['test']}{context}",
                                 78, placeholder="...")
        labels.append((y, label))
        verdict = str(c.get("verdict") or "not run")
        color = VERDICT_COLORS.get(verdict, "black")
        margin = c["margin"]
        direction = str(c.get("direction"))
        if margin == margin and direction == "equivalent":
            ax.fill_betweenx([y - 0.4, y + 0.4], -margin, margin, color="tab:blue", alpha=0.12,
                             lw=0)
        elif margin == margin and direction == "at_most":
            ax.plot([margin, margin], [y - 0.4, y + 0.4], color="tab:blue", ls="--", lw=1.0)
        mean, lo, hi = c["diff_mean"], c["ci_low"], c["ci_high"]
        if verdict == "not run" or mean != mean:
            reason = str(c.get("reason") or "")
            reason = "" if reason == "nan" else reason
            said = reason if reason.startswith(verdict) else f"{verdict}: {reason}"
            ax.text(0.02, y, textwrap.shorten(said, 90, placeholder="..."),
                    transform=text_x, va="center", fontsize=6, color=color, style="italic",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0}, zorder=4)
            drawn = "text"
        elif lo == lo and hi == hi:
            ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], fmt="o", color=color,
                        ms=4, capsize=2.5, lw=1.3)
            drawn = "interval"
        else:
            ax.plot([mean], [y], "o", color=color, ms=4)
            drawn = "point"
        if drawn != "text" and c["seed_diffs"]:
            ax.plot(c["seed_diffs"], [y] * len(c["seed_diffs"]), "|", color=color, ms=5,
                    alpha=0.7)
        rows.append({"row": i, "claim_id": c["claim_id"], "test_id": c["test_id"],
                     "label": label, "verdict": verdict, "direction": c.get("direction"),
                     "diff_mean": mean, "ci_low": lo, "ci_high": hi, "margin": margin,
                     "drawn": drawn})
    if claims:
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks([y for y, _ in labels], [l for _, l in labels], fontsize=6)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlabel("paired difference a - b (percentage points; [passes]: sample-passes "
                      "per training example)")
        handles = [Patch(color=col, label=v) for v, col in VERDICT_COLORS.items()]
        handles.append(Patch(color="tab:blue", alpha=0.2, label="+-margin (equivalence)"))
        handles.append(Line2D([], [], color="tab:blue", ls="--", label="margin (at most)"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6)
    finish(fig, "Point: mean paired difference over seeds; bar: its 95% t-interval; ticks: "
                "per-seed differences; tests without an interval are listed as text.")
    return Rendered(fig, rows, notes)

