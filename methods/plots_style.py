"""What every plot of :mod:`methods.plots` shares: the drawn-plot record, colours, the rc
style, the panel grid, the missing-data note, the caption.  No torch.

Only the standard library is imported at module level (matplotlib and seaborn inside the
functions), so importing :mod:`methods.plots` to read :data:`methods.plots.PLOTS` stays cheap.

Colours: one per method (:func:`method_palette`, fixed over the registered methods, so the same
in every plot and run), one per selection rule (:data:`SELECTION_COLORS`), one per claims
verdict (:data:`VERDICT_COLORS`).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

#: Where each plot's data comes from (named in the figure when the run has none).
ABLATIONS_CONFIG = "workflow/config/ablations.yaml"
CLAIMS_CONFIG = "workflow/config/claims.yaml"
ANY_CONFIG = "workflow/config/default.yaml (any run)"

#: Method colours after tab10's ten (teal, navy, maroon, near-black).
EXTRA_METHOD_COLORS = ("#1b9e77", "#003f5c", "#7a0177", "#222222")
SELECTION_ORDER = ("gs", "cp", "bg", "none", "margin", "grad_norm", "grad_cosine", "random")
#: Selection rules of BB and Selective AT (seaborn "colorblind" shades; grey for none / random).
SELECTION_COLORS = dict(zip(SELECTION_ORDER, ("#0173b2", "#de8f05", "#cc78bc", "#555555",
                                              "#0173b2", "#de8f05", "#cc78bc", "#555555")))
VERDICT_COLORS = {"holds": "#1a9850", "fails": "#d73027", "inconclusive": "#f39c12",
                  "not run": "#999999"}
PANEL_W, PANEL_H = 3.9, 2.9
MIN_WIDTH = 6.5            # inches: room for a one-panel figure's title, legend and note


@dataclass
class Rendered:
    """A drawn plot: the figure, its points (rows of its :data:`methods.plots.COLUMNS`) and
    the notes said in the figure's body about missing data."""
    fig: Any
    rows: List[Dict[str, Any]]
    missing: List[str] = field(default_factory=list)


def style_context():
    """The rc context every plot is drawn in (seaborn whitegrid, paper sizes; Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
                           "legend.fontsize": 6.5, "axes.titlesize": 8.5, "axes.labelsize": 7.5,
                           "xtick.labelsize": 7, "ytick.labelsize": 7, "svg.hashsalt": "advrepro"})


def method_palette() -> Dict[str, Any]:
    """One colour per registered method (sorted names; seaborn's tab10, then
    :data:`EXTRA_METHOD_COLORS`), the same in every plot."""
    import seaborn as sns
    from matplotlib.colors import to_rgb

    from .declared import method_inits

    names = sorted(method_inits())
    colors = sns.color_palette("tab10", 10) + [to_rgb(c) for c in EXTRA_METHOD_COLORS]
    more = sns.color_palette("husl", max(0, len(names) - len(colors)))
    return dict(zip(names, colors[:len(names)] + more))


def method_color(method: str) -> Any:
    """``method``'s colour in :func:`method_palette` (grey for an unregistered name)."""
    return method_palette().get(method, (0.4, 0.4, 0.4))


def selection_color(rule: Any, i: int) -> Any:
    """The colour of selection rule ``rule`` (:data:`SELECTION_COLORS`); else Dark2's ``i``-th."""
    import seaborn as sns

    return SELECTION_COLORS.get(str(rule), sns.color_palette("Dark2", 8)[i % 8])


def grid(n: int, ncols: int, title: str, w: float = PANEL_W, h: float = PANEL_H):
    """A figure titled ``title`` with ``n`` panels of ``w`` x ``h`` inches in rows of
    ``ncols``; returns ``(fig, the n axes in reading order)`` (spare cells switched off)."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(w * ncols, MIN_WIDTH), h * nrows + 0.6),
                             squeeze=False)
    fig.suptitle(title, fontsize=9.5)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def say_missing(ax, text: str, notes: List[str]) -> None:
    """Say in the panel's body what is missing (and remember it in ``notes``)."""
    notes.append(text)
    wrapped = textwrap.fill(text, 42, break_on_hyphens=False, break_long_words=False)
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=7.5, color="dimgray",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def finish(fig, note: str = "") -> None:
    """The caption ``note`` at the bottom; panels laid out above it and below the title."""
    wrapped = textwrap.fill(note, int(fig.get_figwidth() * 17)) if note else ""
    if wrapped:
        fig.text(0.01, 0.005, wrapped, fontsize=6, color="dimgray", va="bottom")
    lines = wrapped.count("\n") + 1 if wrapped else 0
    bottom = min(0.35, (0.11 * lines + 0.04) / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.3 / fig.get_figheight()))


def accuracy_axis(ax, label: str) -> None:
    """y label, and the view kept to [-2, 102] % (t-intervals may reach past 0 or 100)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -2.0), min(hi, 102.0))
    ax.set_ylabel(label)


def pct(v: Optional[float]) -> Optional[float]:
    """A fraction in percent (``None`` stays ``None``)."""
    return None if v is None else 100.0 * float(v)
