"""Tables computed only from result files: never from in-memory state.  No torch.

``aggregate`` reads evaluation JSONs (and the ``train.json`` beside each), writes one CSV row
per (cell, checkpoint) with numbers as numbers, and a Markdown table with accuracies in percent
and their 95% intervals: one column per attack label present in the files (two PGD specs that
differ only in eps are two columns; any metric key, e.g. an evaluation-time defence's
``"MI-OL | PGD-10-1-alpha=2/255 | oblivious"``, is a column too).  Columns of an eps sweep (a
curve of :data:`TABLE_SWEEP_MIN_EPS` or more eps, :mod:`methods.eps_curves`) other than the
evaluation's own eps stay in the CSV and the eps-curve plot and are left out of the Markdown,
which says how many.  The last column is the gradient-masking verdict of the undefended model
(:func:`methods.masking_report.verdict`; ``masking_verdict`` in the CSV); the full report is
its own file.  Each CSV row names its training and evaluation identity (``train_hash``,
``eval_hash``: first 12 hex digits).

Recipe *annotations* (``paper``, ``notes`` and the ``published.rows`` a recipe reproduces;
:func:`methods.config.recipe_annotations`) come from the workflow config, not from any result
file, because they are part of no identity.  Where a recipe names published rows, they are
matched against the published CSVs (``paper_tables/published/*.csv``) by dataset -- source and
scenario (plain, long tail with the row's imbalance ratio), :data:`PUBLISHED_DATASETS` -- and eps
(:func:`published_for`) and set beside the reproduced numbers.

This module, :mod:`methods.cost_plot`, :mod:`methods.eps_curves` and
:mod:`methods.masking_report` import neither torch nor the trainer nor the evaluation (attack
labels come from :mod:`methods.attack_specs`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pandas as pd

from .attack_specs import attack_label
from .config import ConfigError, number
from .eps_curves import curves
from .lt_metrics import summarize
from .masking_report import MASKING_GAP_POINTS
from .masking_report import verdict as masking_verdict
from .published import load_for_tables
from .results import atomic_write_text, read_result
from .text_escape import md_cell

HASH_CHARS = 12
#: An FGSM/PGD curve with at least this many distinct attack eps is an eps sweep: its columns
#: other than the evaluation's own eps stay in the CSV and the eps-curve plot, not the Markdown.
TABLE_SWEEP_MIN_EPS = 3


def _pct(m: Optional[Dict[str, Any]]) -> str:
    if not m or m.get("acc") is None:
        return "n/a"
    lo, hi = m.get("ci95") or (None, None)
    if lo is None or hi is None:
        return f"{100 * m['acc']:.1f}"
    return f"{100 * m['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def load_published(paths: List[Path]) -> pd.DataFrame:
    """The published rows the tables set beside reproduced numbers: the structured CSVs
    validated against their schema, ``value`` the source's text (:func:`methods.published.
    load_for_tables`)."""
    return load_for_tables(paths)


#: How the published CSVs name the datasets a cell may use: CSV name (the text before any
#: " (", so "CIFAR-10 (inferred; ...)" is CIFAR-10) -> (the cell sources it covers, the variant
#: block the cell's dataset entry must carry: ``None`` for a plain dataset -- no long tail, no
#: label noise -- or ``"long_tail"``).  "CIFAR-LT" is a row that does not say which CIFAR.
PUBLISHED_DATASETS: Dict[str, tuple] = {
    "MNIST": (("mnist", "mnist5k"), None),
    "CIFAR-10": (("cifar10",), None),
    "CIFAR-100": (("cifar100",), None),
    "SVHN": (("svhn",), None),
    "CIFAR-10-LT": (("cifar10",), "long_tail"),
    "CIFAR-100-LT": (("cifar100",), "long_tail"),
    "CIFAR-LT": (("cifar10", "cifar100"), "long_tail"),
}
#: Dataset-entry blocks that make a dataset a variant of its source (see PUBLISHED_DATASETS).
DATASET_VARIANTS = ("long_tail", "label_noise")
#: A row whose ``variant`` names an imbalance ratio ("imbalance 100:1") matches only cells whose
#: ``long_tail.imbalance_factor`` is that ratio.
IMBALANCE = re.compile(r"\bimbalance\s+(\d+(?:\.\d+)?)\s*:\s*1\b")


def dataset_matches(row: Mapping[str, Any], dataset: Mapping[str, Any]) -> bool:
    """Whether published ``row`` (its ``dataset`` and ``variant`` columns) is about the cell's
    ``dataset`` entry (``{"source": ..., "long_tail": {...}, ...}``): same source, same scenario
    (:data:`PUBLISHED_DATASETS`), and the row's imbalance ratio if it names one."""
    known = PUBLISHED_DATASETS.get(str(row.get("dataset", "")).split(" (")[0].strip())
    if known is None:
        return False
    sources, scenario = known
    if dataset.get("source") not in sources:
        return False
    variants = {k for k in DATASET_VARIANTS if dataset.get(k)}
    if variants != ({scenario} if scenario else set()):
        return False
    ratio = IMBALANCE.search(str(row.get("variant", "")))
    if ratio:
        factor = (dataset.get("long_tail") or {}).get("imbalance_factor")
        if factor is None or abs(float(factor) - float(ratio.group(1))) > 1e-9:
            return False
    return True


def published_for(cell: Dict[str, Any], annotation: Optional[Mapping[str, Any]],
                  published: pd.DataFrame) -> List[Dict[str, Any]]:
    """Published rows a recipe's annotation says it reproduces (``annotation["published"]
    ["rows"]``: each a mapping of published-CSV column -> value), restricted to the cell's
    dataset (:func:`dataset_matches`) and, where the row states one, the cell's training eps.
    ``annotation`` ``None`` (or without rows): none."""
    wanted = ((annotation or {}).get("published") or {}).get("rows", [])
    if published.empty or not wanted:
        return []
    eps = float(cell["threat"]["eps"])
    out = []
    for w in wanted:
        hit = published
        for key, value in w.items():
            if key not in hit.columns:
                raise ConfigError(f"published.rows: column {key!r} is not in the published CSVs "
                                  f"(columns: {sorted(published.columns)})")
            hit = hit[hit[key].astype(str) == str(value)]
        for row in hit.to_dict("records"):
            if not dataset_matches(row, cell["dataset"]):
                continue
            try:
                row_eps = number(str(row.get("eps")), "published eps")
            except ConfigError:
                row_eps = None  # 'n/a' or a range: no epsilon to compare
            if row_eps is not None and math.isnan(row_eps):
                row_eps = None  # a CSV without an eps column, read beside one with it
            if row_eps is None or abs(row_eps - eps) < 1e-9:
                out.append(row)
    return out


def row_from_record(ev: Mapping[str, Any], tr: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """One table row from an evaluation record and the ``train.json`` beside it (or none)."""
    tr = tr or {}
    cell = ev["cell"]
    row: Dict[str, Any] = {
        "dataset": cell["dataset"]["name"], "arch": cell["arch"]["name"],
        "method": cell["method"], "recipe": cell["recipe"], "seed": cell["seed"],
        "checkpoint": ev["checkpoint"]["name"], "epoch": ev["checkpoint"]["epoch"],
        "eps": ev["threat"]["eps"], "norm": ev["threat"]["norm"], "n_test": ev.get("test_examples"),
    }
    for label, m in ev["metrics"].items():
        row[f"{label}_acc"] = m.get("acc")
        row[f"{label}_ci_low"], row[f"{label}_ci_high"] = m.get("ci95") or (None, None)
    aa = ev.get("autoattack")
    if aa:
        row.update({"AutoAttack_acc": aa["acc"], "AutoAttack_ci_low": aa["ci95"][0],
                    "AutoAttack_ci_high": aa["ci95"][1], "AutoAttack_n": aa["n"],
                    "AutoAttack_version": aa["version"]})
        if aa.get("pgd_same_subset"):
            row["PGD_on_AA_subset_acc"] = aa["pgd_same_subset"]["acc"]
    row["masking_verdict"] = masking_verdict(ev)
    if tr:
        row["co_detected"] = tr["catastrophic_overfitting"]["detected"]
        row["diverged"] = (tr.get("diverged") or {}).get("message")   # None: trained to the end
        row["train_fwd_per_example"] = tr["passes"]["per_example"]["forward"]
        row["train_bwd_per_example"] = tr["passes"]["per_example"]["backward"]
        row["train_wall_s"] = tr["provenance"]["wall_s"]
    row["train_hash"] = cell["train_hash"][:HASH_CHARS]
    row["eval_hash"] = ev["evaluation"]["eval_hash"][:HASH_CHARS]
    row["_metrics"] = ev["metrics"]
    row["_aa"] = aa
    row["_cell"] = cell
    row["_record"] = ev
    row["_train"] = tr
    return row


def rows_from_results(eval_paths: List[Path]) -> List[Dict[str, Any]]:
    rows = []
    for path in eval_paths:
        ev = read_result(path, "eval_result.schema.json")
        train_path = Path(path).parent / "train.json"
        tr = json.loads(train_path.read_text()) if train_path.exists() else {}
        rows.append(row_from_record(ev, tr))
    return rows


def aggregate(eval_paths: List[Path], markdown: Path, csv: Path,
              published: Optional[List[Path]] = None,
              annotations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> pd.DataFrame:
    """Write the CSV and Markdown tables of ``eval_paths``; return the CSV's frame.

    ``published``: published-number CSVs; ``annotations``: ``{recipe: {"paper", "notes",
    "published": {"rows": [...]}}}`` from the workflow config (a recipe without one gets no
    published rows and no notes)."""
    rows = rows_from_results(eval_paths)
    pub = load_published(published or [])
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    if not frame.empty:
        frame = frame.sort_values(["dataset", "arch", "method", "recipe", "seed", "checkpoint"])
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(markdown, render_markdown(rows, pub, annotations or {}))
    return frame


def attack_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """Every attack label present in the rows' metrics, in order of first appearance."""
    labels: List[str] = []
    for r in rows:
        for label in r["_metrics"]:
            if label != "clean" and label not in labels:
                labels.append(label)
    return labels


def sweep_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """Labels of eps-sweep points (:data:`TABLE_SWEEP_MIN_EPS`) at an eps other than their
    evaluation's own, in any row (:func:`methods.eps_curves.curves`)."""
    hidden: List[str] = []
    for r in rows:
        ev = r.get("_record")
        if not ev:
            continue
        own = float(ev["threat"]["eps"])
        for points in curves(ev).values():
            attacked = [p for p in points if p.eps > 0]
            if len({p.eps for p in attacked}) < TABLE_SWEEP_MIN_EPS:
                continue
            for p in attacked:
                if abs(p.eps - own) > 1e-9 * max(1.0, own):
                    hidden += [l for l in p.labels.split("; ") if l not in hidden]
    return hidden


def render_markdown(rows: List[Dict[str, Any]], pub: pd.DataFrame,
                    annotations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
    annotations = annotations or {}
    swept = sweep_columns(rows)
    attack_labels = [l for l in attack_columns(rows) if l not in swept]
    head = (["dataset", "arch", "method", "recipe", "seed", "ckpt", "clean"] + attack_labels
            + ["AutoAttack (n)", "PGD on the AA subset", "fwd+bwd / example", "train s", "CO",
               "masking"])
    caption = ("Accuracy in % with exact 95% binomial intervals; AutoAttack on a seeded "
               "class-stratified test subset of n examples (indices in each eval JSON), with "
               "PGD on the very same examples beside it.  fwd+bwd / example: forward and "
               "backward sample-passes per training example, counted.  masking: the "
               "gradient-masking report's verdict for the undefended model (masking = FGSM "
               f"minus AutoAttack or FGSM minus PGD above {MASKING_GAP_POINTS:g} points with "
               "non-overlapping 95% intervals; suspect = a weaker sign; the report lists them).")
    if swept:
        caption += (f"  {len(swept)} further columns of eps sweeps (FGSM/PGD at other eps) "
                    "are in the CSV and the eps-curve plot.")
    lines = [caption, "", "| " + " | ".join(md_cell(h) for h in head) + " |",
             "|" + "---|" * len(head)]
    key = lambda r: (r["dataset"], r["arch"], r["method"], r["recipe"], r["seed"], r["checkpoint"])
    for r in sorted(rows, key=key):
        aa = r["_aa"]
        passes = (f"{r['train_fwd_per_example']:.1f}+{r['train_bwd_per_example']:.1f}"
                  if "train_fwd_per_example" in r else "n/a")
        ckpt = r["checkpoint"] + (" **DIVERGED**" if r.get("diverged") else "")
        cells = [r["dataset"], r["arch"], r["method"], r["recipe"], str(r["seed"]), ckpt,
                 _pct(r["_metrics"]["clean"])] + [_pct(r["_metrics"].get(l)) for l in attack_labels]
        same = (aa or {}).get("pgd_same_subset")
        cells += [f"{_pct(aa)} ({aa['n']})" if aa else "not run",
                  f"{_pct(same)} {same.get('label') or attack_label(same['attack'])}" if same else "n/a", passes,
                  f"{r['train_wall_s']:.0f}" if "train_wall_s" in r else "n/a",
                  "yes" if r.get("co_detected") else "no",
                  f"**{r['masking_verdict']}**" if r["masking_verdict"] == "masking"
                  else r["masking_verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    diverged = sorted({(r["recipe"], str(r["seed"]), r["diverged"]) for r in rows if r.get("diverged")})
    if diverged:
        lines += ["", "**DIVERGED** rows stopped training at a non-finite loss or weights; their "
                  "checkpoints hold the last finished epoch's weights:", ""]
        lines += [f"- {recipe} seed {seed}: {md_cell(message)}" for recipe, seed, message in diverged]
    published_lines = []
    for r in sorted(rows, key=key):
        for p in published_for(r["_cell"], annotations.get(r["recipe"]), pub):
            published_lines.append(
                f"| {r['recipe']} | {p['paper']} | {p['dataset']} | {p['method']} | "
                f"{p['attack']} | {p['metric']} | {p['value']} | {p['source']} |")
    if published_lines:
        lines += ["", "Published numbers these recipes are set beside (not the same data or "
                  "budget unless the recipe says so):", "",
                  "| recipe | paper | dataset | method | attack | metric | value | source |",
                  "|---|---|---|---|---|---|---|---|"] + sorted(set(published_lines))
    lines += scenario_lines(rows, key)
    notes = [f"| {name} | {md_cell(a.get('paper'))} | {md_cell(a.get('notes'))} |"
             for name, a in sorted(annotations.items())
             if name in {r["recipe"] for r in rows} and (a.get("paper") or a.get("notes"))]
    if notes:
        lines += ["", "Recipes:", "", "| recipe | paper | notes |", "|---|---|---|"] + notes
    return "\n".join(lines) + "\n"


#: Dataset entries whose rows get the long-tail / noisy-label / shift metrics.
SCENARIO_FIELDS = ("long_tail", "label_noise", "spurious")


def _scenario(row: Mapping[str, Any]) -> bool:
    dataset = row["_cell"]["dataset"]
    return any(dataset.get(f) for f in SCENARIO_FIELDS) or "waterbirds" in dataset.get("source", "") \
        or "celeba" in dataset.get("source", "")


def _acc_text(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def scenario_lines(rows: List[Dict[str, Any]], key) -> List[str]:
    """The long-tail / noisy-label / subpopulation-shift rows (:mod:`methods.lt_metrics`, from
    the evaluation file and the ``train.json`` beside it): clean top-1, many / medium / few-shot
    and worst-group accuracy, ECE, and the same top-1 / few / worst-group under AutoAttack."""
    picked = [r for r in sorted(rows, key=key) if _scenario(r) and r.get("_train")]
    if not picked:
        return []
    out = ["", "Long-tail, noisy-label and shift metrics (`methods/lt_metrics.py`; shot thresholds "
           "many: more, few: fewer training images than the row's thresholds, the literature's "
           "100 / 20 scaled by n_max / 500; worst group over the dataset's recorded groups):", "",
           "| dataset | recipe | ckpt | clean | many | medium | few | worst group | ECE | "
           "AutoAttack | AA few | AA worst group | thresholds (many, few) |",
           "|" + "---|" * 13]
    for r in picked:
        try:
            summary = summarize(r["_record"], r["_train"])
        except ValueError as e:   # an older file without per-class counts
            out.append(f"| {r['dataset']} | {r['recipe']} | {r['checkpoint']} | n/a ({md_cell(e)}) |"
                       + " |" * 9)
            continue
        res = summary["results"]
        clean, aa = res.get("clean", {}), res.get("AutoAttack")
        shots = summary["shots"]
        def wg(x):
            return _acc_text((x.get("worst_group") or {}).get("acc")) if x and "worst_group" in x else "n/a"
        out.append("| " + " | ".join([
            r["dataset"], r["recipe"], r["checkpoint"], _acc_text(clean.get("top1")),
            *(_acc_text(clean.get(b, {}).get("acc")) for b in ("many", "medium", "few")),
            wg(clean), "n/a" if clean.get("ece") is None else f"{clean['ece']:.3f}",
            _acc_text(aa.get("top1")) if aa else "not run",
            _acc_text(aa.get("few", {}).get("acc")) if aa else "n/a", wg(aa),
            f"{shots['many_threshold']:g}, {shots['few_threshold']:g}"]) + " |")
    return out
