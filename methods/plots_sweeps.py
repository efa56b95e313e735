"""The sweep plots of :mod:`methods.plots`: robust accuracy along one cell field.  No torch.

* ``train_eps_sweep`` (:func:`draw_train_eps_sweep`): robust accuracy (strongest PGD solid,
  FGSM dashed) against the training eps for lines of cells that differ only in ``threat.eps``
  (:func:`methods.plot_data.sweep_lines`), mean over seeds with its 95% t-band; X: catastrophic
  overfitting in some seed (``k/n``).
* ``bb_ablation`` (:func:`draw_bb_ablation`): BB (method ``bb``) against ``method_args.m``
  (a line per selection rule) and per selection rule; N-FGSM cells of the same
  dataset x arch x eps as reference lines.
* ``selective_ablation`` (:func:`draw_selective_ablation`): Selective AT against ``rho``,
  ``warmup_epochs``, ``lambda_clean`` (a line per selection rule); full PGD AT (method
  ``pgd_at``) as reference lines.

Their CSV rows (:func:`sweep_rows`) have the columns :data:`methods.plots.SWEEP_COLUMNS`.
Only the standard library is imported at module level.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .plots_style import (ABLATIONS_CONFIG, CLAIMS_CONFIG, SELECTION_ORDER, Rendered,
                          accuracy_axis, finish, grid, method_color, pct, say_missing,
                          selection_color)

if TYPE_CHECKING:
    from .plot_data import Line, Point


#: Attack name -> (accuracy, metric label) of a point; the sweep plots' attacks.
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
        values = [pct(ACC_GETTERS[attack](p)[0]) for p in pts]
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
    color = method_color(method)
    for i, (recipe, pts) in enumerate(sorted(by_recipe.items())):
        values = [pct(p.pgd_acc) for p in pts]
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
    from .plot_data import sweep_lines, value_text

    cells = [p for p in points if p.method == method]
    by_sweep = {path: sweep_lines(cells, path, None if path == hue else hue)
                for path, _, _ in sweeps}
    panels = sorted({(l.dataset, l.arch) for lines in by_sweep.values() for l in lines})
    fig, axes = grid(max(1, len(panels)) * len(sweeps), len(sweeps), title)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for r, (dataset, arch) in enumerate(panels or [(None, None)]):
        for c, (path, x_label, panel) in enumerate(sweeps):
            ax = axes[r * len(sweeps) + c]
            lines = [l for l in by_sweep[path] if (l.dataset, l.arch) == (dataset, arch)]
            where = f" for {dataset} / {arch}" if dataset else ""
            if not lines:
                say_missing(ax, f"no {missing_what} {panel} sweep in this run{where}: "
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
                color = (selection_color(line.hue, i) if hue and path != hue
                         else method_color(method) if len(lines) == 1 else selection_color(None, i))
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
                ax.set_xticks(list(positions.values()), [value_text(x) for x in positions])
            ax.set_xlabel(x_label)
            accuracy_axis(ax, "robust accuracy, strongest PGD (%)")
            ax.set_title(f"{panel} -- {dataset} / {arch}")
            ax.legend(loc="best")
    finish(fig, "Mean over seeds with 95% t-interval (band or bars); X: catastrophic "
                "overfitting in k of n seeds.  Reference lines: mean of the reference "
                "method's recipes at the same dataset, arch and training eps.")
    return Rendered(fig, rows, notes)


def draw_train_eps_sweep(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``train_eps_sweep``: a panel per dataset x arch, a line per method (module
    docstring)."""
    from .plot_data import sweep_lines

    lines = sweep_lines(points, "threat.eps", hue="method")
    panels = sorted({(l.dataset, l.arch) for l in lines})
    fig, axes = grid(max(1, len(panels)), 3, "Robust accuracy against the training eps "
                                             "(cells differing only in threat eps)")
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not panels:
        say_missing(axes[0], "no training-eps sweep in this run (cells that differ only in "
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
        accuracy_axis(ax, "robust accuracy at the training eps (%)")
        ax.set_title(f"{dataset} / {arch}")
        _style_legend(ax)
    finish(fig, "Solid: strongest untargeted PGD of the evaluation; dashed: FGSM; both at "
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
        return method_color(str(line.hue))
    shades = sns.dark_palette(method_color(str(line.hue)), len(same) + 1, reverse=True)
    return shades[same.index(line)]


def draw_bb_ablation(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``bb_ablation``: panels m and selection rule, N-FGSM as reference (module docstring)."""
    return _ablation(points, "bb", [("method_args.m", "m (candidates per example)", "m"),
                                    ("method_args.selection", "selection rule", "selection rule")],
                     "method_args.selection", "nfgsm",
                     "Batch-in-Batch: robust accuracy against m and the selection rule", "BB")


def draw_selective_ablation(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``selective_ablation``: panels rho, warm-up, lambda_clean, PGD AT as reference."""
    return _ablation(points, "selective",
                     [("method_args.rho", "rho (fraction of each batch attacked)", "rho"),
                      ("method_args.warmup_epochs", "warm-up epochs (random selection)",
                       "warm-up"),
                      ("method_args.lambda_clean", "lambda_clean (weight of the clean loss)",
                       "lambda_clean")],
                     "method_args.selection", "pgd_at",
                     "Selective AT: robust accuracy against rho, warm-up and lambda_clean",
                     "Selective AT")
