"""The training-record plots of :mod:`methods.plots`: what train.json says.  No torch.

* ``monitor_curves`` (:func:`draw_monitor_curves`): train.json's per-epoch monitor accuracy
  (clean dashed, PGD solid), one panel per method, one thin line per seed, CO epochs marked
  (X and a dotted vertical line).
* ``cost_vs_robustness`` (:func:`draw_cost_vs_robustness`): strongest PGD (o) and AutoAttack
  (^) against fwd+bwd passes per training example, seconds and joules of the training window
  (:func:`methods.cost_plot.training_cost`, the axis chosen as :mod:`methods.cost_plot` does),
  mean and 95% t-intervals over seeds per recipe.

Only the standard library is imported at module level.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .plots_style import (ANY_CONFIG, Rendered, accuracy_axis, finish, grid, method_color, pct,
                          say_missing)

if TYPE_CHECKING:
    from .plot_data import Point


# ----------------------------------------------------------------------------- monitor curves
def draw_monitor_curves(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``monitor_curves``: a panel per method over the points with a per-epoch history."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    with_history = [p for p in points if p.history]
    methods = sorted({p.method for p in with_history})
    fig, axes = grid(max(1, len(methods)), 4, "Per-epoch monitor accuracy (train.json)",
                     w=3.0, h=2.4)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not methods:
        say_missing(axes[0], "no train.json with per-epoch monitor records among the evaluation "
                             f"files: {ANY_CONFIG}", notes)
    for ax, method in zip(axes, methods):
        mine = [p for p in with_history if p.method == method]
        models = sorted({(p.dataset, p.arch, p.recipe) for p in mine})
        several = len({(p.dataset, p.arch) for p in mine}) > 1
        shades = dict(zip(models, sns.dark_palette(method_color(method), len(models) + 2,
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
    finish(fig, "Solid: PGD accuracy of the monitor (train.json monitor: held-out images, "
                "PGD at the training eps); dashed: clean.  One thin line per seed; "
                "X and dotted line: an epoch flagged as catastrophic overfitting.")
    return Rendered(fig, rows, notes)


# ----------------------------------------------------------------------------- cost
def draw_cost_vs_robustness(points: Sequence["Point"], claims_csv: Path) -> Rendered:
    """``cost_vs_robustness``: per dataset x arch a row of three panels (passes, time,
    energy) over the points with a PGD or AutoAttack accuracy."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .cost_plot import ENERGY_AXES, TIME_AXES, cost_axis
    from .plot_data import panels_of, seed_stats

    pts = [p for p in points if p.pgd_acc is not None or p.aa_acc is not None]
    panels = panels_of(pts)
    costs = [p.cost for p in pts]
    time_axis, energy_axis = cost_axis(costs, TIME_AXES), cost_axis(costs, ENERGY_AXES)
    axes_spec = [("passes", "fwd+bwd passes per training example (counted)"), time_axis,
                 energy_axis]
    fig, axes = grid(max(1, len(panels)) * 3, 3, "Robust accuracy against training cost")
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not panels:
        for ax in axes:
            say_missing(ax, f"no evaluation with a train.json in this run: {ANY_CONFIG}", notes)
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
                st = seed_stats([pct(get(p)) for p in g])
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
                say_missing(ax, ("time not measured" if c == 1 else "energy not measured") +
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
                            color=method_color(row["method"]), ms=4.5, capsize=2, lw=0.8,
                            mec="black", mew=0.4)
                if row["metric"] != "AutoAttack":
                    ax.annotate(row["recipe"], (xm, ym), fontsize=4.5, xytext=(3, 2),
                                textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(spec[1])
            accuracy_axis(ax, "robust accuracy (%)")
        _cost_legend(axes[r * 3], rows, dataset, arch)
    finish(fig, "o: strongest untargeted PGD at the training eps; ^: AutoAttack (its subset) "
                "where run.  Mean over seeds per recipe with 95% t-intervals in both "
                "directions.  Cost: the train.json measurement window 'train' (plus earlier "
                "sessions' epochs when resumed).")
    return Rendered(fig, rows, notes)


def _cost_legend(ax, rows, dataset, arch) -> None:
    from matplotlib.lines import Line2D

    methods = sorted({x["method"] for x in rows if (x["dataset"], x["arch"]) == (dataset, arch)})
    handles = [Line2D([], [], marker="o", ls="", color=method_color(m), label=m) for m in methods]
    handles += [Line2D([], [], marker="^", ls="", color="gray", mec="black", label="AutoAttack")]
    ax.legend(handles=handles, loc="best", fontsize=5)
