"""Ablation and diagnostic plots, computed only from result files.  No torch.

``write_plots(eval_paths, claims_csv, out_dir)`` (``python -m methods plots``) always writes the
same files, :func:`plot_files`: for every name in :data:`PLOTS`, ``<name>.png``, ``<name>.pdf``
and ``<name>.csv`` (the plotted points, accuracies in percent).  A plot without data in this
run is still drawn and says in its body what is missing and which workflow config produces it;
its CSV then holds only its header (:data:`COLUMNS`).

Each plot has a drawer in :data:`DRAWERS` (points, claims CSV) -> :class:`Rendered`; what each
draws is said in its module:

* :mod:`methods.plots_sweeps`: ``train_eps_sweep``, ``bb_ablation``, ``selective_ablation``
  (robust accuracy along one cell field, mean over seeds with 95% t-intervals);
* :mod:`methods.plots_training`: ``monitor_curves``, ``cost_vs_robustness`` (train.json's
  per-epoch monitor and training cost);
* :mod:`methods.plots_claims`: ``claims_intervals`` (the claims CSV of :mod:`methods.claims`).

The points come from :func:`methods.plot_data.load_points`; colours, rc style, panel grid and
captions are shared through :mod:`methods.plots_style` (one colour per method, the same in every
plot and run).  PDFs carry no creation date, so re-running on the same results gives the same
bytes.  Only the standard library is imported at module level (here and in the drawer
modules), so ``from methods.plots import PLOTS`` is cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Sequence, Tuple

from .plots_claims import draw_claims_intervals
from .plots_style import Rendered, style_context
from .plots_sweeps import draw_bb_ablation, draw_selective_ablation, draw_train_eps_sweep
from .plots_training import draw_cost_vs_robustness, draw_monitor_curves

if TYPE_CHECKING:
    from .plot_data import Point

#: The CSV columns of each plot, in :data:`PLOTS` order.
SWEEP_COLUMNS = ["dataset", "arch", "panel", "line", "method", "x", "attack", "attack_label",
                 "n_seeds", "acc_mean_pct", "acc_ci_low_pct", "acc_ci_high_pct", "seeds",
                 "values_pct", "co_seeds", "recipes"]
COLUMNS: Dict[str, List[str]] = {
    "train_eps_sweep": SWEEP_COLUMNS,
    "bb_ablation": SWEEP_COLUMNS,
    "selective_ablation": SWEEP_COLUMNS,
    "monitor_curves": ["dataset", "arch", "method", "recipe", "seed", "epoch", "clean_acc_pct",
                       "pgd_acc_pct", "co"],
    "cost_vs_robustness": ["dataset", "arch", "method", "recipe", "metric", "n_seeds",
                           "acc_mean_pct", "acc_ci_low_pct", "acc_ci_high_pct",
                           "passes_mean", "passes_ci_low", "passes_ci_high", "time_field",
                           "time_mean", "time_ci_low", "time_ci_high", "energy_field",
                           "energy_mean", "energy_ci_low", "energy_ci_high"],
    "claims_intervals": ["row", "claim_id", "test_id", "label", "verdict", "direction",
                         "diff_mean", "ci_low", "ci_high", "margin", "drawn"],
}
#: The plots, in the order they are written.
PLOTS: Tuple[str, ...] = tuple(COLUMNS)
SUFFIXES = (".png", ".pdf", ".csv")
DPI = 100                  # of the PNGs


def plot_files(out_dir: Path) -> List[Path]:
    """Every file :func:`write_plots` writes into ``out_dir``: ``<name>.png``, ``.pdf``,
    ``.csv`` for each name in :data:`PLOTS`."""
    return [Path(out_dir) / f"{name}{s}" for name in PLOTS for s in SUFFIXES]


def write_plots(eval_paths: Sequence[Path], claims_csv: Path, out_dir: Path) -> List[Path]:
    """Draw every plot of :data:`PLOTS` from ``eval_paths`` (and the ``train.json`` beside each)
    and ``claims_csv``; write :func:`plot_files` atomically; return them."""
    import matplotlib.pyplot as plt

    from .plot_data import load_points

    points = load_points(list(eval_paths))
    for name in PLOTS:
        shown = render(name, points, Path(claims_csv))
        save(shown, Path(out_dir), name)
        plt.close(shown.fig)
    return plot_files(out_dir)


def render(name: str, points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """Draw plot ``name`` (one of :data:`PLOTS`) from loaded points and the claims CSV."""
    if name not in DRAWERS:
        raise KeyError(f"unknown plot {name!r}; plots: {list(PLOTS)}")
    with style_context():
        return DRAWERS[name](points, claims_csv)


def save(shown: Rendered, out_dir: Path, name: str) -> None:
    """``<name>.png``, ``.pdf`` (no creation date) and ``.csv`` into ``out_dir``, atomically."""
    import pandas as pd

    from .results import atomic_write, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{name}.png",
                 lambda tmp: shown.fig.savefig(tmp, format="png", dpi=DPI))
    atomic_write(out_dir / f"{name}.pdf", lambda tmp: shown.fig.savefig(
        tmp, format="pdf", metadata={"CreationDate": None, "ModDate": None}))
    frame = pd.DataFrame(shown.rows, columns=COLUMNS[name])
    atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index=False))


#: Plot name -> drawer (points, claims CSV) -> Rendered; the keys are :data:`PLOTS`.
DRAWERS: Dict[str, Callable[[Sequence["Point"], Path], Rendered]] = {
    "train_eps_sweep": draw_train_eps_sweep,
    "bb_ablation": draw_bb_ablation,
    "selective_ablation": draw_selective_ablation,
    "monitor_curves": draw_monitor_curves,
    "cost_vs_robustness": draw_cost_vs_robustness,
    "claims_intervals": draw_claims_intervals,
}
assert tuple(DRAWERS) == PLOTS, "DRAWERS and COLUMNS must name the same plots in one order"
