"""The points :mod:`methods.plots` draws, read only from result files.  No torch.

One :class:`Point` per trained cell (``train_hash``) among the evaluation files: the evaluation
of checkpoint ``last`` when the cell has one, else the first of its evaluations in path order.
Files without a ``train.json`` beside them are left out (they carry no training record: no
catastrophic-overfitting flag, no cost).  Numbers come from :func:`methods.tables.rows_from_results`
(identity, FGSM, AutoAttack, CO, fwd+bwd passes) and :func:`methods.cost_plot.result_points`
(strongest untargeted PGD at the evaluation's own threat; the training cost windows).

Sweeps (:func:`sweep_lines`): a *line* is a set of cells of one dataset x arch that are equal
in every field of the resolved cell (``method_args`` completed with the method's declared
defaults, :func:`method_defaults`) except the swept path ``x``, the recipe name, the seed and
the hash -- e.g. ``fgsm_rs_mnist``, ``fgsm_rs_mnist-eps0.2``, ``-eps0.3`` differ only in
``threat.eps``.  Two recipes with the very same training identity but their names (e.g.
``bb_single_gs`` and ``bb_ablate_m``) give one point: the first recipe in name order.

Intervals over seeds (:func:`seed_stats`): mean with the two-sided 95% Student-t interval
``mean +- t(0.975, n-1) * sd / sqrt(n)`` (sd with n-1); none for a single seed.  The interval
is :func:`methods.claims.paired_interval`'s, the one the claims' verdicts use.
"""
from __future__ import annotations

import ast
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .claims import paired_interval
from .cost_plot import COST_FIELDS, result_points
from .declared import method_inits
from .tables import rows_from_results

#: The checkpoint whose evaluation stands for a cell when it has several.
PREFERRED_CHECKPOINT = "last"
#: Cell fields that name a cell rather than say how it was trained.
NAMING_FIELDS = ("recipe", "seed", "train_hash")


@dataclass
class Point:
    """One trained cell's numbers (accuracies as fractions; ``None`` where not measured)."""
    file: str
    dataset: str
    arch: str
    method: str
    recipe: str
    seed: int
    checkpoint: str
    eps: float                                   # the cell's (training) threat eps
    norm: str
    identity: Dict[str, Any]                     # flattened cell without NAMING_FIELDS
    pgd_label: Optional[str]
    pgd_acc: Optional[float]
    fgsm_label: Optional[str]
    fgsm_acc: Optional[float]
    aa_acc: Optional[float]
    co: bool                                     # CO detected in any epoch
    co_epochs: List[int]
    passes_per_example: Optional[float]          # forward + backward, counted
    cost: Dict[str, Optional[float]]             # methods.cost_plot.training_cost fields
    history: List[Dict[str, Any]] = field(default_factory=list)
    monitor: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- cell identity
def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists (and empty dicts) become JSON text leaves."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, path + "."))
        elif isinstance(v, (list, tuple, Mapping)):
            out[path] = json.dumps(v, sort_keys=True)
        else:
            out[path] = v
    return out


@functools.lru_cache(maxsize=None)
def method_defaults(method: str) -> Dict[str, Any]:
    """The literal keyword defaults of ``method``'s ``__init__`` (read from the source by
    :func:`methods.declared.method_inits`; a default that is not a literal is left out)."""
    init = method_inits().get(method)
    if init is None:
        return {}
    out = {}
    for arg, default in zip(init.args.kwonlyargs, init.args.kw_defaults):
        if default is None or arg.arg == "threat":
            continue
        try:
            out[arg.arg] = ast.literal_eval(default)
        except ValueError:
            continue
    return out


def cell_identity(cell: Mapping[str, Any]) -> Dict[str, Any]:
    """The flattened cell without its naming fields, ``method_args`` completed with defaults."""
    body = {k: v for k, v in cell.items() if k not in NAMING_FIELDS}
    body["method_args"] = {**method_defaults(str(cell["method"])),
                           **(cell.get("method_args") or {})}
    return flatten(body)


# ----------------------------------------------------------------------------- points
def _plain_fgsm(metrics: Mapping[str, Any]) -> Optional[str]:
    """The label of FGSM at the evaluation's own threat (no own eps / norm, no defence)."""
    for label, m in metrics.items():
        a = m.get("attack") or {}
        if (a.get("name") == "fgsm" and a.get("eps") is None and a.get("norm") is None
                and not a.get("targeted") and not m.get("defense")):
            return label
    return None


def load_points(eval_paths: Sequence[Path]) -> List[Point]:
    """One :class:`Point` per trained cell among ``eval_paths`` (module docstring)."""
    paths = sorted(str(p) for p in eval_paths)
    costs = {p["file"]: p for p in result_points("", files=paths)}
    kept = [p for p in paths if p in costs]
    chosen: Dict[str, Point] = {}
    for path, row in zip(kept, rows_from_results([Path(p) for p in kept])):
        cell, tr, cost = row["_cell"], row["_train"], costs[path]
        fgsm = _plain_fgsm(row["_metrics"])
        history = list(tr.get("history") or [])
        flagged = {int(h["epoch"]) for h in history if h.get("catastrophic_overfitting")}
        co_epochs = sorted(set((tr.get("catastrophic_overfitting") or {}).get("epochs") or [])
                           | flagged)
        passes = tr["passes"]["per_example"]
        point = Point(
            file=path, dataset=row["dataset"], arch=row["arch"], method=row["method"],
            recipe=row["recipe"], seed=int(row["seed"]), checkpoint=row["checkpoint"],
            eps=float(cell["threat"]["eps"]), norm=str(cell["threat"]["norm"]),
            identity=cell_identity(cell), pgd_label=cost["pgd_label"], pgd_acc=cost["pgd_acc"],
            fgsm_label=fgsm, fgsm_acc=row["_metrics"][fgsm]["acc"] if fgsm else None,
            aa_acc=cost["autoattack_acc"],
            co=bool(row.get("co_detected")) or bool(co_epochs), co_epochs=co_epochs,
            passes_per_example=(float(passes["forward"]) + float(passes["backward"])
                                if "forward" in passes and "backward" in passes else None),
            cost={k: cost.get(k) for k in COST_FIELDS},
            history=history, monitor=dict(tr.get("monitor") or {}))
        key = cell["train_hash"]
        if key not in chosen or (chosen[key].checkpoint != PREFERRED_CHECKPOINT
                                 and point.checkpoint == PREFERRED_CHECKPOINT):
            chosen[key] = point
    return sorted(chosen.values(), key=lambda p: (p.dataset, p.arch, p.method, p.recipe, p.seed))


# ----------------------------------------------------------------------------- seed statistics
def seed_stats(values: Sequence[float]) -> Dict[str, Any]:
    """``{"n", "mean", "ci_low", "ci_high"}`` over ``values`` (module docstring); ``None``
    and NaN entries are dropped; the interval is NaN for fewer than two values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"n": 0, "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean, low, high = paired_interval(vals, level=0.95)
    if low is None or high is None:
        return {"n": len(vals), "mean": mean, "ci_low": math.nan, "ci_high": math.nan}
    return {"n": len(vals), "mean": mean, "ci_low": float(low), "ci_high": float(high)}


# ----------------------------------------------------------------------------- sweeps
@dataclass
class Line:
    """Cells of one dataset x arch equal in everything but ``x`` (and their names): seeds
    per x value, in x order."""
    dataset: str
    arch: str
    hue: Any                                     # the value of the hue path (None: no hue)
    label: str                                   # hue and what sets this line apart
    by_x: Dict[Any, List[Point]]                 # x value -> one point per seed

    def recipes(self, x: Any) -> List[str]:
        return sorted({p.recipe for p in self.by_x[x]})


def _short(path: str) -> str:
    return path.split(".")[-1]


def value_text(v: Any) -> str:
    """A cell value as a label: floats in ``%g`` (0.25, 1e-05), anything else ``str``."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def sweep_lines(points: Sequence[Point], x: str, hue: Optional[str] = None,
                min_x: int = 2) -> List[Line]:
    """The lines along identity path ``x`` (e.g. ``"threat.eps"``, ``"method_args.m"``) with at
    least ``min_x`` distinct x values, coloured by identity path ``hue``; points without
    ``x`` are skipped.  A line's label is its hue value and the other identity fields (short
    names) in which it differs from the lines of the same hue in its panel."""
    groups: Dict[Tuple, Dict[Any, Dict[int, Point]]] = {}
    rests: Dict[Tuple, Dict[str, Any]] = {}
    for p in sorted(points, key=lambda p: (p.recipe, p.seed)):
        if x not in p.identity:
            continue
        rest = {k: v for k, v in p.identity.items() if k not in (x, hue)}
        key = (p.dataset, p.arch, p.identity.get(hue) if hue else None,
               json.dumps(rest, sort_keys=True, default=str))
        groups.setdefault(key, {}).setdefault(p.identity[x], {}).setdefault(p.seed, p)
        rests[key] = rest
    kept = [k for k, by_x in groups.items() if len(by_x) >= min_x]
    lines = []
    for key in kept:
        dataset, arch, hue_value, _ = key
        peers = [k for k in kept if k[:3] == key[:3] and k != key]
        differs = sorted(path for path in rests[key]
                         if any(rests[k].get(path) != rests[key][path] for k in peers))
        extra = ", ".join(f"{_short(d)}={value_text(rests[key][d])}" for d in differs)
        label = ", ".join(s for s in (value_text(hue_value) if hue else "", extra) if s) or "all"
        by_x = {xv: [seeds[s] for s in sorted(seeds)] for xv, seeds in groups[key].items()}
        lines.append(Line(dataset, arch, hue_value, label, by_x))
    return sorted(lines, key=lambda l: (l.dataset, l.arch, value_text(l.hue), l.label))


def panels_of(points: Sequence[Point]) -> List[Tuple[str, str]]:
    """The (dataset, arch) pairs of ``points`` in sorted order."""
    return sorted({(p.dataset, p.arch) for p in points})


# ----------------------------------------------------------------------------- claims CSV
#: The claims CSV's columns (:data:`methods.claims.CSV_COLUMNS`) that the interval plot reads
#: (``role``, a premise or a test, is read where present).
CLAIMS_COLUMNS = ("claim_id", "test_id", "test", "context", "diff_mean", "ci_low", "ci_high",
                  "margin", "direction", "verdict", "reason", "values_a", "values_b")


def read_claims(path: Path) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """The claims CSV's rows (numbers as floats, NaN where empty) and ``None``, or ``[]`` and
    why there are none (no file, or an empty table).  A file missing a column is an error
    naming the file and the columns."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        return [], f"no claims table at {path}"
    try:
        frame = pd.read_csv(path, dtype={"claim_id": str, "test_id": str})
    except pd.errors.EmptyDataError:
        return [], f"the claims table {path} is empty"
    missing = [c for c in CLAIMS_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"claims CSV {path}: columns {missing} missing "
                         f"(it has {list(frame.columns)})")
    if frame.empty:
        return [], f"the claims table {path} has no rows"
    rows = []
    for r in frame.to_dict("records"):
        for c in ("diff_mean", "ci_low", "ci_high", "margin"):
            r[c] = pd.to_numeric(r.get(c), errors="coerce")
            r[c] = math.nan if r[c] is None else float(r[c])
        r["seed_diffs"] = _seed_diffs(r.get("values_a"), r.get("values_b"))
        rows.append(r)
    return rows, None


def _seed_diffs(a: Any, b: Any) -> List[float]:
    """Per-seed differences a - b from the JSON lists (empty when either is not a list of
    numbers of the same length)."""
    try:
        va, vb = json.loads(a), json.loads(b)
        if len(va) == len(vb):
            return [float(x) - float(y) for x, y in zip(va, vb)
                    if x is not None and y is not None]
    except (TypeError, ValueError):
        pass
    return []
