"""Robust accuracy against training cost, rendered only from a run's result files.

For every ``eval_*.json`` matched by ``results_glob`` (relative paths are under the repository
root) and the ``train.json`` beside it:

* y: the accuracy under the strongest untargeted PGD column at the evaluation's own threat
  (most steps x restarts; a spec with its own ``eps`` / ``norm`` or ``targeted`` is skipped,
  and so is every metric of an evaluation-time defence -- keys ``"<defence> | <attack> |
  <mode>"``, which carry a ``defense`` block: the plot is about the trained model itself),
  or ``pgd_metric`` if set, and, where present, under AutoAttack;
* x: the training cost of the cell's ``train`` measurement window (path ``train`` or
  ``run/train``), plus the ``train/epoch_*`` windows of earlier sessions (``measurement.previous_sessions``) when the cell was resumed.
  Time is GPU-seconds (``gpu_s``) when every point has it, otherwise process CPU seconds
  (``cpu_s``, all threads); energy is GPU joules (``gpu_energy_j``) when every point has it,
  otherwise CPU package joules (RAPL ``cpu_energy_j``) when every point has those.  The axis
  labels say which was used.

Published points: rows of the published CSVs that a recipe's annotation names in
``published.rows`` (``annotations``: ``{recipe: {"published": {"rows": [...]}}}`` from
:func:`methods.config.recipe_annotations`, matched as :func:`methods.tables.published_for`
does; no annotations, no published points) whose metric is a training time, paired with the
robust-accuracy row of the same paper, dataset, method and eps.  Their times are the papers'
own wall-clock on their hardware, which the legend says.

Like :mod:`methods.tables`, this module imports no torch (it reads result files only).
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .config import REPO_ROOT
from .results import read_result
from .tables import load_published, published_for

TIME_METRIC = re.compile(r"training time \((seconds|minutes|hours)\)")
TIME_UNITS_S = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0}
COST_FIELDS = ("wall_s", "cpu_s", "gpu_s", "gpu_energy_j", "cpu_energy_j")
# (field, axis label) in order of preference; the first field every point has is used.
TIME_AXES = (("gpu_s", "training cost (GPU-seconds)"),
             ("cpu_s", "training cost (CPU seconds, process, all threads; no GPU)"))
ENERGY_AXES = (("gpu_energy_j", "training energy (GPU joules)"),
               ("cpu_energy_j", "training energy (CPU package joules, RAPL)"))


def _abs(pattern: str) -> str:
    return pattern if Path(pattern).is_absolute() else str(REPO_ROOT / pattern)


def training_cost(train: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The cost fields summed over the ``train`` window and earlier sessions' epoch windows;
    ``None`` for a field any of those windows lacks."""
    m = train["measurement"]
    parent = lambda r: r["path"].split("/")[-2] if "/" in r["path"] else None
    windows = [r for r in m["records"] if r["name"] == "train"][-1:]
    windows += [r for r in m.get("previous_sessions") or []
                if r["name"].startswith("epoch_") and parent(r) == "train"]
    cost: Dict[str, Optional[float]] = {}
    for field in COST_FIELDS:
        values = [w.get(field) for w in windows]
        cost[field] = None if not values or None in values else float(sum(values))
    return cost


def _strongest_pgd(metrics: Dict[str, Any], wanted: Optional[str]) -> Optional[str]:
    if wanted:
        return wanted if wanted in metrics else None
    plain = lambda a: (a.get("name") == "pgd" and not a.get("targeted")
                       and a.get("eps") is None and a.get("norm") is None)
    pgd = [k for k, v in metrics.items() if plain(v.get("attack") or {}) and not v.get("defense")]
    strength = lambda k: (int(metrics[k]["attack"].get("steps", 0))
                          * int(metrics[k]["attack"].get("restarts", 1)), k)
    return max(pgd, key=strength) if pgd else None


def result_points(pattern: str, pgd_metric: Optional[str] = None,
                  files: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Points from evaluation files: ``files`` when given (the rule's inputs), else the glob."""
    points = []
    paths = sorted(files) if files is not None else sorted(glob.glob(_abs(pattern), recursive=True))
    for path in paths:
        train_path = Path(path).parent / "train.json"
        if not train_path.exists():
            continue
        ev = read_result(Path(path), "eval_result.schema.json")
        train = read_result(train_path, "train_result.schema.json")
        label = _strongest_pgd(ev["metrics"], pgd_metric)
        aa = ev.get("autoattack")
        points.append({
            "file": str(path), "recipe": ev["cell"]["recipe"], "method": ev["cell"]["method"],
            "arch": ev["cell"]["arch"]["name"], "seed": ev["cell"]["seed"],
            "checkpoint": ev["checkpoint"]["name"], "pgd_label": label,
            "pgd_acc": ev["metrics"][label]["acc"] if label else None,
            "autoattack_acc": aa["acc"] if aa else None, "autoattack_n": aa["n"] if aa else None,
            **training_cost(train), "_cell": ev["cell"]})
    return points


def published_points(points: List[Dict[str, Any]], csv_paths: List[str],
                     annotations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Published (training time, robust accuracy) points for the recipes in ``points``, from
    the rows their ``annotations`` name (none without annotations)."""
    pub = load_published([Path(_abs(p)) for p in csv_paths])
    annotations = annotations or {}
    out, seen = [], set()
    for p in points:
        rows = published_for(p["_cell"], annotations.get(p["recipe"]), pub)
        times = [r for r in rows if TIME_METRIC.fullmatch(str(r["metric"]).strip())]
        robust = [r for r in rows if str(r["metric"]).startswith("robust accuracy")]
        for t in times:
            key = lambda r: (r["paper"], r["dataset"], r["method"], str(r["eps"]))
            for r in (r for r in robust if key(r) == key(t)):
                try:
                    unit = TIME_METRIC.fullmatch(str(t["metric"]).strip()).group(1)
                    point = {"paper": t["paper"], "dataset": t["dataset"], "method": t["method"],
                             "seconds": float(t["value"]) * TIME_UNITS_S[unit],
                             "robust_acc": float(r["value"]) / 100, "attack": r["attack"],
                             "recipe": p["recipe"]}
                except ValueError:
                    continue   # a value such as ">13" is not a point
                if (point["paper"], point["method"], point["seconds"]) not in seen:
                    seen.add((point["paper"], point["method"], point["seconds"]))
                    out.append(point)
    return out


def cost_axis(costs: Sequence[Mapping[str, Any]], choices) -> Optional[tuple]:
    """The first ``(field, label)`` of ``choices`` (e.g. :data:`TIME_AXES`) that every cost
    record in ``costs`` has, or None."""
    for field, label in choices:
        if costs and all(c.get(field) is not None for c in costs):
            return field, label
    return None


def plot_cost_vs_robustness(spec: Dict[str, Any], path: Path,
                            annotations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """Write the figure to ``path`` (atomically); return what it shows.  ``annotations``: the
    recipes' annotations (:func:`methods.config.recipe_annotations`); without them the plot
    shows no published points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .results import atomic_write

    pattern = spec.get("results_glob", "results/**/eval_last.json")
    files = spec.get("files")
    points = result_points(pattern, spec.get("pgd_metric"), files)
    if files is not None:
        pattern = f"{len(files)} evaluation files"
    published = published_points(points, list(spec.get("published") or []), annotations)
    time_axis, energy_axis = cost_axis(points, TIME_AXES), cost_axis(points, ENERGY_AXES)
    panels = [a for a in (time_axis, energy_axis) if a is not None]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)) + 3, 5.2),
                             squeeze=False)
    axes = list(axes[0])
    summary = {"results_glob": pattern, "points": len(points), "published_points": len(published),
               "time_axis": time_axis[1] if time_axis else None,
               "energy_axis": energy_axis[1] if energy_axis else None,
               "rows": [{k: v for k, v in p.items() if not k.startswith("_")} for p in points]}
    if not points:
        axes[0].text(0.5, 0.5, f"no run results found\n({pattern})", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    else:
        colors = {r: plt.cm.tab10(i % 10) for i, r in enumerate(dict.fromkeys(p["recipe"] for p in points))}
        for ax, (field, label) in zip(axes, panels):
            for p in points:
                for key, marker in (("pgd_acc", "o"), ("autoattack_acc", "^")):
                    if p[key] is not None:
                        ax.scatter(p[field], 100 * p[key], color=colors[p["recipe"]], marker=marker,
                                   s=45, edgecolor="black", linewidth=0.5)
                ax.annotate(p["recipe"], (p[field], 100 * (p["pgd_acc"] or 0)), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            if field.endswith("_s"):
                for q in published:
                    ax.scatter(q["seconds"], 100 * q["robust_acc"], marker="X", color="gray", s=70)
                    ax.annotate(f"{q['method']} ({q['dataset']})", (q["seconds"], 100 * q["robust_acc"]),
                                fontsize=7, xytext=(4, -9), textcoords="offset points", color="gray")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("robust accuracy (%)")
            ax.grid(True, alpha=0.3)
        labels = {p["pgd_label"] for p in points if p["pgd_label"]}
        handles = [plt.Line2D([], [], marker="o", ls="", color="k", label=f"PGD ({', '.join(sorted(labels))})"),
                   plt.Line2D([], [], marker="^", ls="", color="k", label="AutoAttack (subset)")]
        handles += [plt.Line2D([], [], marker="s", ls="", color=c, label=r) for r, c in colors.items()]
        if published:
            handles.append(plt.Line2D([], [], marker="X", ls="", color="gray",
                                      label="published: reported wall-clock\non their hardware"))
        fig.legend(handles=handles, loc="center right", fontsize=8)
        fig.subplots_adjust(right=1 - 2.8 / fig.get_figwidth(), wspace=0.25, bottom=0.15)
        if energy_axis is None:
            fig.text(0.01, 0.01, "no energy readings in the result files (no GPU meter, no RAPL)",
                     fontsize=8, color="gray")
    fig.suptitle("Robust accuracy vs training cost (from the run's result files)")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return summary
