"""Ablation and diagnostic plots, computed only from result files.  No torch.

``write_plots(eval_paths, claims_csv, out_dir)`` (``python -m methods plots``) always writes the
same files, :func:`plot_files`: for every name in :data:`PLOTS`, ``<name>.png``, ``<name>.pdf``
and ``<name>.csv`` (the plotted points, accuracies in percent).  A plot without data in this
run is still drawn and says in its body what is missing and which workflow config produces it;
its CSV then holds only its header (:data:`COLUMNS`).

* ``train_eps_sweep``: robust accuracy (strongest PGD solid, FGSM dashed) against the training
  eps for lines of cells that differ only in ``threat.eps`` (:func:`methods.plot_data.sweep_lines`),
  mean over seeds with its 95% t-band; X: catastrophic overfitting in some seed (``k/n``).
* ``bb_ablation``: BB (method ``bb``) against ``method_args.m`` (a line per selection rule) and
  per selection rule; N-FGSM cells of the same dataset x arch x eps as reference lines.
* ``selective_ablation``: Selective AT against ``rho``, ``warmup_epochs``, ``lambda_clean``
  (a line per selection rule); full PGD AT (method ``pgd_at``) as reference lines.
* ``monitor_curves``: train.json's per-epoch monitor accuracy (clean dashed, PGD solid), one
  panel per method, one thin line per seed, CO epochs marked (X and a dotted vertical line).
* ``cost_vs_robustness``: strongest PGD (o) and AutoAttack (^) against fwd+bwd passes per
  training example, seconds and joules of the training window
  (:func:`methods.cost_plot.training_cost`, the axis chosen as :mod:`methods.cost_plot` does),
  mean and 95% t-intervals over seeds per recipe.
* ``claims_intervals``: the claims CSV (:mod:`methods.claims`): per test the paired difference
  a - b in points with its 95% interval, zero line, +-margin shaded for equivalence tests,
  dashed margin for at-most tests, colour by verdict, per-seed differences as ticks; tests
  without an interval (not run, too few seeds) as text rows.

Colours: one per method (:func:`method_palette`, fixed over the registered methods, so the same
in every plot and run) and one per selection rule (:data:`SELECTION_COLORS`).  PDFs carry no
creation date, so re-running on the same results gives the same bytes.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from .plot_data import Line, Point

#: Where each plot's data comes from (named in the figure when the run has none).
ABLATIONS_CONFIG = "workflow/config/ablations.yaml"
CLAIMS_CONFIG = "workflow/config/claims.yaml"
ANY_CONFIG = "workflow/config/default.yaml (any run)"

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

#: Method colours after tab10's ten (teal, navy, maroon, near-black).
EXTRA_METHOD_COLORS = ("#1b9e77", "#003f5c", "#7a0177", "#222222")
SELECTION_ORDER = ("gs", "cp", "bg", "none", "margin", "grad_norm", "grad_cosine", "random")
#: Selection rules of BB and Selective AT (seaborn "colorblind" shades; grey for none / random).
SELECTION_COLORS = dict(zip(SELECTION_ORDER, ("#0173b2", "#de8f05", "#cc78bc", "#555555",
                                              "#0173b2", "#de8f05", "#cc78bc", "#555555")))
VERDICT_COLORS = {"holds": "#1a9850", "fails": "#d73027", "inconclusive": "#f39c12",
                  "not run": "#999999"}
PANEL_W, PANEL_H, DPI = 3.9, 2.9, 100
MIN_WIDTH = 6.5            # inches: room for a one-panel figure's title, legend and note


def plot_files(out_dir: Path) -> List[Path]:
    """Every file :func:`write_plots` writes into ``out_dir``: ``<name>.png``, ``.pdf``,
    ``.csv`` for each name in :data:`PLOTS`."""
    return [Path(out_dir) / f"{name}{s}" for name in PLOTS for s in SUFFIXES]


@dataclass
class Rendered:
    """A drawn plot: the figure, its points (rows of its :data:`COLUMNS`) and the notes said
    in the figure's body about missing data."""
    fig: Any
    rows: List[Dict[str, Any]]
    missing: List[str] = field(default_factory=list)


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
    with _style():
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


# ----------------------------------------------------------------------------- style helpers
def _style():
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


def _color(method: str) -> Any:
    return method_palette().get(method, (0.4, 0.4, 0.4))


def _selection_color(rule: Any, i: int) -> Any:
    import seaborn as sns

    return SELECTION_COLORS.get(str(rule), sns.color_palette("Dark2", 8)[i % 8])


def _grid(n: int, ncols: int, title: str, w: float = PANEL_W, h: float = PANEL_H):
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


def _missing(ax, text: str, notes: List[str]) -> None:
    """Say in the panel's body what is missing (and remember it in ``notes``)."""
    notes.append(text)
    wrapped = textwrap.fill(text, 42, break_on_hyphens=False, break_long_words=False)
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=7.5, color="dimgray",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(fig, note: str = "") -> None:
    """The caption ``note`` at the bottom; panels laid out above it and below the title."""
    wrapped = textwrap.fill(note, int(fig.get_figwidth() * 17)) if note else ""
    if wrapped:
        fig.text(0.01, 0.005, wrapped, fontsize=6, color="dimgray", va="bottom")
    lines = wrapped.count("\n") + 1 if wrapped else 0
    bottom = min(0.35, (0.11 * lines + 0.04) / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.3 / fig.get_figheight()))


def _accuracy_axis(ax, label: str) -> None:
    """y label, and the view kept to [-2, 102] % (t-intervals may reach past 0 or 100)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -2.0), min(hi, 102.0))
    ax.set_ylabel(label)


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * float(v)


def _x_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- sweeps
ACC_GETTERS: Dict[str, Callable[["Point"], Tuple[Optional[float], Optional[str]]]] = {
    "PGD": lambda p: (p.pgd_acc, p.pgd_label),
    "FGSM": lambda p: (p.fgsm_acc, p.fgsm_label),
}


def sweep_rows(line: "Line", panel: str, attack: str) -> List[Dict[str, Any]]:
    """One CSV row per x value of ``line`` under ``attack`` (a key of :data:`ACC_GETTERS`):
    mean and 95% t-interval over seeds in percent (x values without any accuracy left out)."""
    from .plot_data import seed_stats

    rows = []
    for x in sorted(line.by_x, key=_sort_key):
        pts = [p for p in line.by_x[x] if ACC_GETTERS[attack](p)[0] is not None]
        if not pts:
            continue
        values = [_pct(ACC_GETTERS[attack](p)[0]) for p in pts]
        st = seed_stats(values)
        labels = sorted({str(ACC_GETTERS[attack](p)[1]) for p in pts})
        rows.append({"dataset": line.dataset, "arch": line.arch, "panel": panel,
                     "line": line.label, "method": pts[0].method, "x": x, "attack": attack,
                     "attack_label": "; ".join(labels), "n_seeds": st["n"],
                     "acc_mean_pct": st["mean"], "acc_ci_low_pct": st["ci_low"],
                     "acc_ci_high_pct": st["ci_high"], "seeds": str([p.seed for p in pts]),
                     "values_pct": str(values), "co_seeds": sum(p.co for p in pts),
                     "recipes": "; ".join(sorted({p.recipe for p in pts}))})
    return rows


def _sort_key(x: Any):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return (0, float(x), "")
    order = SELECTION_ORDER.index(x) if x in SELECTION_ORDER else len(SELECTION_ORDER)
    return (1, order, str(x))


def _draw_line(ax, rows: List[Dict[str, Any]], color, style: str, label: Optional[str],
               positions: Optional[Dict[Any, float]] = None) -> None:
    """Mean over seeds with its band (numeric x) or error bars (categorical ``positions``);
    X where some seed overfit catastrophically, with k/n beside it."""
    if not rows:
        return
    xs = [positions[r["x"]] if positions else r["x"] for r in rows]
    ys = [r["acc_mean_pct"] for r in rows]
    lo = [r["acc_ci_low_pct"] for r in rows]
    hi = [r["acc_ci_high_pct"] for r in rows]
    if positions:
        yerr = [[max(0.0, y - l) if l == l else 0.0 for y, l in zip(ys, lo)],
                [max(0.0, h - y) if h == h else 0.0 for y, h in zip(ys, hi)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", ls="none", color=color, ms=4, capsize=2.5,
                    lw=1.2, label=label)
    else:
        ax.plot(xs, ys, ls=style, marker="o", ms=3.5, color=color, lw=1.3, label=label)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    for x, r in zip(xs, rows):
        if r["co_seeds"]:
            ax.scatter([x], [r["acc_mean_pct"]], marker="X", s=70, color=color,
                       edgecolor="black", linewidth=0.6, zorder=6)
            ax.annotate(f"CO {r['co_seeds']}/{r['n_seeds']}", (x, r["acc_mean_pct"]),
                        fontsize=5.5, xytext=(4, 4), textcoords="offset points")


def _reference(ax, points: Sequence["Point"], method: str, dataset: str, arch: str,
               eps: set, panel: str, rows: List[Dict[str, Any]]) -> None:
    """Horizontal lines (mean, 95% band over seeds) of strongest PGD for ``method``'s recipes on
    the same dataset x arch at one of the training ``eps``."""
    from .plot_data import seed_stats

    by_recipe: Dict[str, List["Point"]] = {}
    for p in points:
        if (p.method, p.dataset, p.arch) == (method, dataset, arch) and p.eps in eps \
                and p.pgd_acc is not None:
            by_recipe.setdefault(p.recipe, []).append(p)
    color = _color(method)
    for i, (recipe, pts) in enumerate(sorted(by_recipe.items())):
        values = [_pct(p.pgd_acc) for p in pts]
        st = seed_stats(values)
        ls = (":", "-.", (0, (1, 3)))[i % 3]
        ax.axhline(st["mean"], color=color, ls=ls, lw=1.1, label=f"reference: {recipe}")
        if st["n"] > 1:
            ax.axhspan(st["ci_low"], st["ci_high"], color=color, alpha=0.1, lw=0)
        rows.append({"dataset": dataset, "arch": arch, "panel": f"reference ({panel})",
                     "line": f"reference: {recipe}", "method": method, "x": None,
                     "attack": "PGD",
                     "attack_label": "; ".join(sorted({str(p.pgd_label) for p in pts})),
                     "n_seeds": st["n"], "acc_mean_pct": st["mean"],
                     "acc_ci_low_pct": st["ci_low"], "acc_ci_high_pct": st["ci_high"],
                     "seeds": str([p.seed for p in pts]), "values_pct": str(values),
                     "co_seeds": sum(p.co for p in pts), "recipes": recipe})


def _ablation(points: Sequence["Point"], method: str, sweeps: Sequence[Tuple[str, str, str]],
              hue: Optional[str], reference: str, title: str, missing_what: str) -> Rendered:
    """Panels of ``method``'s cells along each sweep (identity path, x label, panel name), one
    row per dataset x arch, a line per ``hue`` value, ``reference`` method's cells as lines."""
    from .plot_data import sweep_lines

    cells = [p for p in points if p.method == method]
    by_sweep = {path: sweep_lines(cells, path, None if path == hue else hue)
                for path, _, _ in sweeps}
    panels = sorted({(l.dataset, l.arch) for lines in by_sweep.values() for l in lines})
    fig, axes = _grid(max(1, len(panels)) * len(sweeps), len(sweeps), title)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for r, (dataset, arch) in enumerate(panels or [(None, None)]):
        for c, (path, x_label, panel) in enumerate(sweeps):
            ax = axes[r * len(sweeps) + c]
            lines = [l for l in by_sweep[path] if (l.dataset, l.arch) == (dataset, arch)]
            where = f" for {dataset} / {arch}" if dataset else ""
            if not lines:
                _missing(ax, f"no {missing_what} {panel} sweep in this run{where}: "
                             f"{ABLATIONS_CONFIG}", notes)
                ax.set_title(f"{panel}" + (f" -- {dataset} / {arch}" if dataset else ""))
                continue
            categorical = any(not isinstance(x, (int, float)) or isinstance(x, bool)
                              for l in lines for x in l.by_x)
            xs = sorted({x for l in lines for x in l.by_x}, key=_sort_key)
            positions = {x: float(i) for i, x in enumerate(xs)} if categorical else None
            for i, line in enumerate(lines):
                line_rows = sweep_rows(line, panel, "PGD")
                rows += line_rows
                color = (_selection_color(line.hue, i) if hue and path != hue
                         else _color(method) if len(lines) == 1 else _selection_color(None, i))
                if positions:
                    shift = 0.08 * (i - (len(lines) - 1) / 2)
                    positions_i = {x: v + shift for x, v in positions.items()}
                else:
                    positions_i = None
                _draw_line(ax, line_rows, color, "-",
                           method if line.label == "all" else line.label, positions_i)
            eps = {p.eps for l in lines for pts in l.by_x.values() for p in pts}
            _reference(ax, points, reference, dataset, arch, eps, panel, rows)
            if positions:
                ax.set_xticks(list(positions.values()), [_x_text(x) for x in positions])
            ax.set_xlabel(x_label)
            _accuracy_axis(ax, "robust accuracy, strongest PGD (%)")
            ax.set_title(f"{panel} -- {dataset} / {arch}")
            ax.legend(loc="best")
    _finish(fig, "Mean over seeds with 95% t-interval (band or bars); X: catastrophic "
                 "overfitting in k of n seeds.  Reference lines: mean of the reference "
                 "method's recipes at the same dataset, arch and training eps.")
    return Rendered(fig, rows, notes)


def draw_train_eps_sweep(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    from .plot_data import sweep_lines

    lines = sweep_lines(points, "threat.eps", hue="method")
    panels = sorted({(l.dataset, l.arch) for l in lines})
    fig, axes = _grid(max(1, len(panels)), 3, "Robust accuracy against the training eps "
                                              "(cells differing only in threat eps)")
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not panels:
        _missing(axes[0], "no training-eps sweep in this run (cells that differ only in "
                          "threat eps, e.g. fgsm_rs_mnist, fgsm_rs_mnist-eps0.2, -eps0.3): "
                          f"{CLAIMS_CONFIG}", notes)
    for ax, (dataset, arch) in zip(axes, panels):
        norms = set()
        mine = [l for l in lines if (l.dataset, l.arch) == (dataset, arch)]
        for line in mine:
            color = _shade(line, mine)
            for attack, style in (("PGD", "-"), ("FGSM", "--")):
                line_rows = sweep_rows(line, "train_eps", attack)
                rows += line_rows
                _draw_line(ax, line_rows, color, style, line.label if attack == "PGD" else None)
            norms |= {p.norm for pts in line.by_x.values() for p in pts}
        ax.set_xlabel(f"training eps ({', '.join(sorted(norms))})")
        _accuracy_axis(ax, "robust accuracy at the training eps (%)")
        ax.set_title(f"{dataset} / {arch}")
        _style_legend(ax)
    _finish(fig, "Solid: strongest untargeted PGD of the evaluation; dashed: FGSM; both at "
                 "the cell's own (training) eps.  Mean over seeds, band: 95% t-interval.  "
                 "X: catastrophic overfitting (train.json) in k of n seeds.")
    return Rendered(fig, rows, notes)


def _style_legend(ax) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls="-", label="PGD (strongest)"),
                Line2D([], [], color="k", ls="--", label="FGSM"),
                Line2D([], [], color="w", marker="X", mfc="gray", mec="k", ms=7,
                       label="catastrophic overfitting")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _shade(line: "Line", panel_lines: Sequence["Line"]) -> Any:
    """The method's colour; lines of one method in one panel get darker shades of it."""
    import seaborn as sns

    same = [l for l in panel_lines if l.hue == line.hue]
    if len(same) == 1:
        return _color(str(line.hue))
    return sns.dark_palette(_color(str(line.hue)), len(same) + 1, reverse=True)[same.index(line)]


def draw_bb_ablation(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    return _ablation(points, "bb", [("method_args.m", "m (candidates per example)", "m"),
                                    ("method_args.selection", "selection rule", "selection rule")],
                     "method_args.selection", "nfgsm",
                     "Batch-in-Batch: robust accuracy against m and the selection rule", "BB")


def draw_selective_ablation(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    return _ablation(points, "selective",
                     [("method_args.rho", "rho (fraction of each batch attacked)", "rho"),
                      ("method_args.warmup_epochs", "warm-up epochs (random selection)",
                       "warm-up"),
                      ("method_args.lambda_clean", "lambda_clean (weight of the clean loss)",
                       "lambda_clean")],
                     "method_args.selection", "pgd_at",
                     "Selective AT: robust accuracy against rho, warm-up and lambda_clean",
                     "Selective AT")


# ----------------------------------------------------------------------------- monitor curves
def draw_monitor_curves(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    with_history = [p for p in points if p.history]
    methods = sorted({p.method for p in with_history})
    fig, axes = _grid(max(1, len(methods)), 4, "Per-epoch monitor accuracy (train.json)",
                      w=3.0, h=2.4)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not methods:
        _missing(axes[0], "no train.json with per-epoch monitor records among the evaluation "
                          f"files: {ANY_CONFIG}", notes)
    for ax, method in zip(axes, methods):
        mine = [p for p in with_history if p.method == method]
        models = sorted({(p.dataset, p.arch, p.recipe) for p in mine})
        several = len({(p.dataset, p.arch) for p in mine}) > 1
        shades = dict(zip(models, sns.dark_palette(_color(method), len(models) + 2,
                                                   reverse=True)[:len(models)]))
        for p in mine:
            color = shades[(p.dataset, p.arch, p.recipe)]
            epochs = [int(h["epoch"]) + 1 for h in p.history]
            first = p.seed == min(q.seed for q in mine if q.recipe == p.recipe
                                  and (q.dataset, q.arch) == (p.dataset, p.arch))
            ax.plot(epochs, [100 * h["pgd_acc"] for h in p.history], "-", color=color, lw=0.8,
                    label=(f"{p.recipe} ({p.dataset} / {p.arch})" if several else p.recipe)
                    if first else None)
            ax.plot(epochs, [100 * h["clean_acc"] for h in p.history], "--", color=color,
                    lw=0.6, alpha=0.8)
            for h, e in zip(p.history, epochs):
                co = int(h["epoch"]) in p.co_epochs
                rows.append({"dataset": p.dataset, "arch": p.arch, "method": method,
                             "recipe": p.recipe, "seed": p.seed, "epoch": int(h["epoch"]),
                             "clean_acc_pct": 100 * h["clean_acc"],
                             "pgd_acc_pct": 100 * h["pgd_acc"], "co": co})
                if co:
                    ax.axvline(e, color=color, ls=":", lw=0.7)
                    ax.scatter([e], [100 * h["pgd_acc"]], marker="X", s=45, color=color,
                               edgecolor="black", linewidth=0.5, zorder=6)
        steps = sorted({str(p.monitor.get("steps")) for p in mine if p.monitor.get("steps")})
        ax.set_title(method + (f" (monitor PGD-{'/'.join(steps)})" if steps else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("monitor accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.legend(loc="best", fontsize=5, framealpha=0.6)
    _finish(fig, "Solid: PGD accuracy of the monitor (train.json monitor: held-out images, "
                 "PGD at the training eps); dashed: clean.  One thin line per seed; "
                 "X and dotted line: an epoch flagged as catastrophic overfitting.")
    return Rendered(fig, rows, notes)


# ----------------------------------------------------------------------------- cost
def _cost_axis(points: Sequence["Point"], choices) -> Optional[Tuple[str, str]]:
    """The first ``(field, label)`` of ``choices`` that every point has (as cost_plot does)."""
    for fld, label in choices:
        if points and all(p.cost.get(fld) is not None for p in points):
            return fld, label
    return None


def draw_cost_vs_robustness(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .cost_plot import ENERGY_AXES, TIME_AXES
    from .plot_data import panels_of, seed_stats

    pts = [p for p in points if p.pgd_acc is not None or p.aa_acc is not None]
    panels = panels_of(pts)
    time_axis, energy_axis = _cost_axis(pts, TIME_AXES), _cost_axis(pts, ENERGY_AXES)
    axes_spec = [("passes", "fwd+bwd passes per training example (counted)"), time_axis,
                 energy_axis]
    fig, axes = _grid(max(1, len(panels)) * 3, 3, "Robust accuracy against training cost")
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not panels:
        for ax in axes:
            _missing(ax, f"no evaluation with a train.json in this run: {ANY_CONFIG}", notes)
    for r, (dataset, arch) in enumerate(panels):
        mine = [p for p in pts if (p.dataset, p.arch) == (dataset, arch)]
        groups: Dict[Tuple[str, str], List["Point"]] = {}
        for p in mine:
            groups.setdefault((p.method, p.recipe), []).append(p)
        stats = {}
        for (method, recipe), g in sorted(groups.items()):
            xs = {"passes": seed_stats([p.passes_per_example for p in g])}
            for key, axis in (("time", time_axis), ("energy", energy_axis)):
                xs[key] = seed_stats([p.cost.get(axis[0]) for p in g]) if axis else None
            stats[(method, recipe)] = xs
            for metric, get in (("PGD", lambda p: p.pgd_acc), ("AutoAttack", lambda p: p.aa_acc)):
                st = seed_stats([_pct(get(p)) for p in g])
                if not st["n"]:
                    continue
                name = ("; ".join(sorted({str(p.pgd_label) for p in g})) if metric == "PGD"
                        else metric)
                row = {"dataset": dataset, "arch": arch, "method": method, "recipe": recipe,
                       "metric": name, "n_seeds": st["n"], "acc_mean_pct": st["mean"],
                       "acc_ci_low_pct": st["ci_low"], "acc_ci_high_pct": st["ci_high"],
                       "time_field": time_axis[0] if time_axis else None,
                       "energy_field": energy_axis[0] if energy_axis else None}
                for key in ("passes", "time", "energy"):
                    s = xs[key] or {}
                    row.update({f"{key}_mean": s.get("mean"), f"{key}_ci_low": s.get("ci_low"),
                                f"{key}_ci_high": s.get("ci_high")})
                rows.append(row)
        for c, spec in enumerate(axes_spec):
            ax = axes[r * 3 + c]
            ax.set_title(f"{dataset} / {arch}")
            if spec is None:
                _missing(ax, ("time not measured" if c == 1 else "energy not measured") +
                         " (no GPU meter or RAPL readings in every train.json)", notes)
                continue
            key = ("passes", "time", "energy")[c]
            for row in (x for x in rows if (x["dataset"], x["arch"]) == (dataset, arch)):
                xm, xl, xh = row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"]
                if xm is None or xm != xm:
                    continue
                ym, yl, yh = row["acc_mean_pct"], row["acc_ci_low_pct"], row["acc_ci_high_pct"]
                err = lambda m, lo, hi: ([[m - lo], [hi - m]] if lo == lo and hi == hi else None)
                ax.errorbar([xm], [ym], xerr=err(xm, xl, xh), yerr=err(ym, yl, yh),
                            fmt="o" if row["metric"] != "AutoAttack" else "^",
                            color=_color(row["method"]), ms=4.5, capsize=2, lw=0.8,
                            mec="black", mew=0.4)
                if row["metric"] != "AutoAttack":
                    ax.annotate(row["recipe"], (xm, ym), fontsize=4.5, xytext=(3, 2),
                                textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(spec[1])
            _accuracy_axis(ax, "robust accuracy (%)")
        _cost_legend(axes[r * 3], rows, dataset, arch)
    _finish(fig, "o: strongest untargeted PGD at the training eps; ^: AutoAttack (its subset) "
                 "where run.  Mean over seeds per recipe with 95% t-intervals in both "
                 "directions.  Cost: the train.json measurement window 'train' (plus earlier "
                 "sessions' epochs when resumed).")
    return Rendered(fig, rows, notes)


def _cost_legend(ax, rows, dataset, arch) -> None:
    from matplotlib.lines import Line2D

    methods = sorted({x["method"] for x in rows if (x["dataset"], x["arch"]) == (dataset, arch)})
    handles = [Line2D([], [], marker="o", ls="", color=_color(m), label=m) for m in methods]
    handles += [Line2D([], [], marker="^", ls="", color="gray", mec="black", label="AutoAttack")]
    ax.legend(handles=handles, loc="best", fontsize=5)


# ----------------------------------------------------------------------------- claims
def draw_claims_intervals(points: Sequence["Point"], claims_csv: Path) -> Rendered:
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
        _missing(ax, f"{why}: run {CLAIMS_CONFIG}, then `python -m methods claims` "
                     "(methods/claims.py)", notes)
    text_x = ax.get_yaxis_transform()
    labels = []
    for i, c in enumerate(claims):
        y = n - 1 - i
        role = "" if str(c.get("role", "test")) in ("test", "nan") else f" ({c['role']})"
        context = "" if str(c["context"]) in ("", "nan") else f" [{c['context']}]"
        label = textwrap.shorten(f"{c['claim_id']}/{c['test_id']}{role}: {c['test']}{context}",
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
        ax.set_xlabel("paired difference a - b (percentage points)")
        handles = [Patch(color=col, label=v) for v, col in VERDICT_COLORS.items()]
        handles.append(Patch(color="tab:blue", alpha=0.2, label="+-margin (equivalence)"))
        handles.append(Line2D([], [], color="tab:blue", ls="--", label="margin (at most)"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6)
    _finish(fig, "Point: mean paired difference over seeds; bar: its 95% t-interval; ticks: "
                 "per-seed differences; tests without an interval are listed as text.")
    return Rendered(fig, rows, notes)


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
