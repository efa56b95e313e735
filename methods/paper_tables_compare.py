"""Published rows against this run's cells: the CSV rows of a paper table.  No torch.

A published row's reproduced value comes only from this run's cells whose recipe links the row
in its annotation (:func:`methods.config.recipe_annotations`, matched by
:func:`methods.tables.published_for` on the cell's dataset and eps; :func:`links`):
``published.rows`` = the same protocol (a verdict, :func:`methods.paper_tables_band.verdict`),
``published.different_protocol`` = ``[{match, why}]`` (shown with its ``why``, verdict
``not comparable``).  The number is the one the row's metric names
(:func:`methods.paper_tables_measure.measure`); none: ``not comparable`` with the reason.  A row
no cell of this run links (:func:`unlinked`): ``not run`` naming the paper.yaml cells (the row's
``cells``) that would reproduce it, or ``no runnable cell`` with the row's ``no_cell_reason``.

Markers (:data:`MARKERS`): a number from the ``best`` checkpoint (chosen on held-out or test data
during training), from AutoAttack on a subset smaller than the test set (``subset n=50``), from a
different protocol, and a band from one seed.

CSV (numbers as numbers, accuracies in points; columns :data:`CSV_COLUMNS`): one row per
(published row x linked cell) or unlinked published row (``section`` ``published``:
:func:`compare`, :func:`unlinked`) and per (run cell x metric) (``section`` ``run``:
:func:`run_rows`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pandas as pd

from .config import ConfigError
from .paper_tables_band import ONE_SEED, verdict
from .paper_tables_measure import Measured, RunGroup, group_metrics, measure, value_text
from .tables import published_for, sweep_columns

#: Every verdict of a published row, in the order the index counts them.
VERDICTS = ("within band", "below", "above", "not comparable", "not run", "no runnable cell")
#: Marker (its prefix; ``subset n=`` takes the subset size) -> its legend text.
MARKERS = {
    "best ckpt": "the best checkpoint: chosen on held-out (or test) data during training, not "
                 "the last epoch",
    "subset n=": "AutoAttack on a seeded stratified test subset of N examples, fewer than the "
                 "test set",
    "diff. protocol": "the recipe links the row as another protocol (the reason says what "
                      "differs): shown for comparison, no verdict",
    ONE_SEED: "one seed: the band is the binomial interval alone (no seed variance)",
}
#: The columns of ``<key>.csv``.
CSV_COLUMNS = ["table", "section", "paper_key", "published_id", "paper", "evidence", "source",
               "pub_method", "pub_variant", "pub_dataset", "pub_arch", "pub_eps", "pub_metric",
               "pub_attack", "metric_kind", "published", "value_qualifier", "link", "dataset",
               "arch", "method", "recipe", "checkpoint", "metric_label", "n_seeds", "seeds",
               "n_examples", "mean", "ci_low", "ci_high", "half_width", "band_rule", "delta",
               "verdict", "reason", "markers", "pub_note"]
#: CSV column -> the published-CSV column it copies as text.
PUBLISHED_TEXT = {"paper_key": "paper_key", "published_id": "id", "paper": "paper",
                  "evidence": "evidence", "source": "source", "pub_method": "method",
                  "pub_variant": "variant", "pub_dataset": "dataset", "pub_arch": "arch",
                  "pub_eps": "eps", "pub_metric": "metric", "pub_attack": "attack",
                  "metric_kind": "metric_kind", "pub_note": "note"}


def _markers(group: Optional[RunGroup], got: Optional[Measured], link: str) -> List[str]:
    """The :data:`MARKERS` of a number read from ``group`` linked as ``link``."""
    out = []
    if group is not None and group.checkpoint == "best":
        out.append("best ckpt")
    if got is not None and got.subset_n is not None:
        out.append(f"subset n={got.subset_n}")
    if link == "different_protocol":
        out.append("diff. protocol")
    if got is not None and len(got.accs) == 1:
        out.append(ONE_SEED)
    return out


def _published_fields(table: str, row: Mapping[str, Any]) -> Dict[str, Any]:
    """The CSV columns that describe published ``row`` (its value a float, NaN if none)."""
    value = row.get("value")
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    return {"table": table, "section": "published",
            **{col: value_text(row.get(name)) for col, name in PUBLISHED_TEXT.items()},
            "published": value, "value_qualifier": value_text(row.get("value_qualifier"))}


def _numbers(got: Measured) -> Dict[str, Any]:
    """The CSV columns of a measured number and its band."""
    b = got.band
    return {"metric_label": got.label, "n_seeds": b.n, "seeds": ";".join(map(str, got.seeds)),
            "n_examples": min(got.totals), "mean": b.mean, "ci_low": b.low, "ci_high": b.high,
            "half_width": b.half_width, "band_rule": b.rule}


def compare(table: str, row: Mapping[str, Any], group: RunGroup, link: str,
            why: str = "") -> Dict[str, Any]:
    """The CSV row of published ``row`` against run ``group`` linked as ``link``."""
    out = _published_fields(table, row)
    out.update({"link": link, "dataset": group.dataset, "arch": group.arch,
                "method": group.method, "recipe": group.recipe, "checkpoint": group.checkpoint})
    got = measure(row, group)
    reasons = []
    if isinstance(got, str):
        reasons.append(got)
        got = None
    else:
        out.update(_numbers(got))
        if not math.isnan(out["published"]):
            out["delta"] = out["mean"] - out["published"]
    if link == "different_protocol":
        reasons.append(f"different protocol: {' '.join(str(why).split())}")
    if got is not None and not reasons and math.isnan(out["published"]):
        reasons.append("the published value is not a number")
    if reasons:
        out["verdict"], out["reason"] = "not comparable", "; ".join(reasons)
    else:
        out["verdict"] = verdict(got.band, out["published"], out["value_qualifier"])
    out["markers"] = "; ".join(_markers(group, got, link))
    return out


def unlinked(table: str, row: Mapping[str, Any], run_cells: set) -> Dict[str, Any]:
    """The CSV row of a published row no cell of this run links."""
    out = _published_fields(table, row)
    cells = [c.strip() for c in value_text(row.get("cells")).split(";") if c.strip()]
    present = [c for c in cells if c in run_cells]
    if present:
        out["verdict"] = "not comparable"
        out["reason"] = (f"cell(s) {', '.join(present)} ran, but the recipe's annotation does not "
                         "link this row (dataset, eps or match differ)")
    elif cells:
        out["verdict"] = "not run"
        out["reason"] = "paper.yaml cells that would reproduce it: " + ", ".join(cells)
    else:
        out["verdict"] = "no runnable cell"
        out["reason"] = (value_text(row.get("no_cell_reason"))
                         or "no cell of the suite reproduces it")
    return out


def links(groups: List[RunGroup], annotations: Mapping[str, Mapping[str, Any]],
          pub: pd.DataFrame) -> Dict[str, List[Tuple[RunGroup, str, str]]]:
    """published id -> [(group, "rows" | "different_protocol", why)]: the rows each group's
    recipe links (a row linked both ways counts as the different protocol)."""
    out: Dict[str, List[Tuple[RunGroup, str, str]]] = {}
    if pub.empty:
        return out
    for g in groups:
        ann = annotations.get(g.recipe)
        if not ann:
            continue
        found: Dict[str, Tuple[str, str]] = {}
        for r in published_for(g.cell, ann, pub):
            found[str(r["id"])] = ("rows", "")
        for i, dp in enumerate(((ann.get("published") or {}).get("different_protocol") or [])):
            if not isinstance(dp, Mapping) or not isinstance(dp.get("match"), Mapping):
                raise ConfigError(f"recipe {g.recipe}: published.different_protocol[{i}].match: "
                                  "expected a mapping of published-CSV column -> value, got "
                                  f"{dp!r}")
            for r in published_for(g.cell, {"published": {"rows": [dp["match"]]}}, pub):
                found[str(r["id"])] = ("different_protocol", str(dp.get("why", "")))
        for pid, (link, why) in found.items():
            out.setdefault(pid, []).append((g, link, why))
    return out


def run_rows(table: str, groups: List[RunGroup]) -> List[Dict[str, Any]]:
    """CSV rows of the This-run section: one per (group, metric label), AutoAttack included."""
    out = []
    swept = set(sweep_columns([r for g in groups for r in g.rows]))
    for g in groups:
        for got in group_metrics(g, swept):
            out.append({"table": table, "section": "run", "dataset": g.dataset, "arch": g.arch,
                        "method": g.method, "recipe": g.recipe, "checkpoint": g.checkpoint,
                        **_numbers(got), "markers": "; ".join(_markers(g, got, ""))})
    return out

