"""Long-tail, noisy-label and subpopulation metrics, computed from the result files alone (no torch).

Input: one ``eval_*.json`` (accuracy records with per-class counts; per-group counts and a
calibration histogram where the evaluation wrote them, :mod:`methods.eval_extras`) and the
``train.json`` beside it, whose ``data`` block is the dataset manifest: the *train* class counts
(``data.splits.train.class_counts``, counted on the clean labels, i.e. the true size of every
class after the long-tail subsampling) and, for subpopulation datasets, the group names
(``data.groups``).

For every accuracy record (clean, each attack, AutoAttack and the PGD run on its subset):

* ``top1`` -- pooled accuracy (on the balanced test set for the long-tail variants);
  ``mean_class_acc`` -- the mean of the per-class accuracies; ``per_class_acc``;
  ``worst_class``.
* ``many`` / ``medium`` / ``few`` -- the mean per-class accuracy over the classes of each shot
  bucket, as OLTR's ``shot_acc`` (Liu et al., *Large-Scale Long-Tailed Recognition in an Open
  World*, CVPR 2019): many-shot classes have more than ``many_threshold`` training images,
  few-shot classes fewer than ``few_threshold``, medium-shot the rest.  The literature's
  thresholds are 100 and 20 for a head class of 500 images (CIFAR-100-LT) or more (ImageNet-LT,
  Places-LT).  ``scale="head"`` (default) scales them with the head class: thresholds x
  (n_max / 500), n_max = the largest train class -- for MNIST-5k-LT (imbalance 100, 10 per
  class held out: n_max = 390) that is many > 78, few < 15.6; for CIFAR-100-LT with a 10-per-class
  meta set held out (n_max = 490) 98 and 19.6; for CIFAR-100-LT without (n_max = 500) exactly
  100 and 20.  ``scale="none"`` keeps 100 and 20.  The thresholds used, the rule and the classes
  of each bucket are written into the output.
* ``worst_group`` / ``mean_group_acc`` / ``per_group_acc`` -- from ``per_group`` counts, groups
  with no test example skipped (the worst group's size is reported with it).
* ``ece`` -- expected calibration error from the histogram (``calibration``: per bin ``count``,
  ``correct``, ``confidence_sum``): ECE = sum_b |correct_b - confidence_sum_b| / N, and ``mce``
  = max over non-empty bins of |accuracy_b - mean confidence_b| (Guo et al. 2017).

Usage: ``python -m methods.lt_metrics results/.../eval_last.json [--scale head|none]`` prints
the summary as JSON; :func:`headline` flattens it into table columns.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

MANY_SHOT, FEW_SHOT, REFERENCE_N_MAX = 100, 20, 500

#: How the literature's thresholds are scaled to a train set whose head class has n_max images.
SCALES: Dict[str, Callable[[int], float]] = {
    "head": lambda n_max: n_max / REFERENCE_N_MAX,
    "none": lambda n_max: 1.0,
}
SCALE_RULES = {
    "head": f"thresholds x (n_max / {REFERENCE_N_MAX}), n_max = the largest train class",
    "none": "the literature's thresholds unscaled",
}


def _acc(correct: int, total: int) -> Optional[float]:
    return correct / total if total else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def shot_thresholds(train_counts: Sequence[int], scale: str = "head", many: float = MANY_SHOT,
                    few: float = FEW_SHOT) -> Dict[str, Any]:
    """Shot buckets of the classes by their train counts (module docstring), with the rule used."""
    if scale not in SCALES:
        raise ValueError(f"shot scale {scale!r}: must be one of {sorted(SCALES)}")
    counts = [int(n) for n in train_counts]
    if not counts:
        raise ValueError("shot_thresholds: no train class counts")
    n_max = max(counts)
    factor = SCALES[scale](n_max)
    many_t, few_t = many * factor, few * factor
    classes: Dict[str, List[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        classes["many" if n > many_t else "few" if n < few_t else "medium"].append(c)
    return {"scale": scale, "rule": SCALE_RULES[scale], "factor": factor, "n_max": n_max,
            "reference_n_max": REFERENCE_N_MAX, "literature": {"many": many, "few": few},
            "many_threshold": many_t, "few_threshold": few_t,
            "definition": "many: n_train > many_threshold; few: n_train < few_threshold; medium: the rest",
            "train_class_counts": counts, "classes": classes}


def expected_calibration_error(hist: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """``{"ece", "mce", "n"}`` from a calibration histogram (per-bin count, correct, confidence_sum)."""
    count, correct, conf = hist["count"], hist["correct"], hist["confidence_sum"]
    if not len(count) == len(correct) == len(conf):
        raise ValueError("calibration histogram: count, correct and confidence_sum differ in length")
    n = sum(count)
    if n == 0:
        return {"ece": None, "mce": None, "n": 0}
    gaps = [abs(k - s) for k, s in zip(correct, conf)]
    mce = max(abs(k - s) / m for k, s, m in zip(correct, conf, count) if m)
    return {"ece": sum(gaps) / n, "mce": mce, "n": n}


def worst_group(per_group: Mapping[str, Sequence[int]], names: Optional[Sequence[str]] = None
                ) -> Dict[str, Any]:
    """Worst-group accuracy (groups with no example skipped), its group, and the mean over groups."""
    accs = [_acc(k, n) for k, n in zip(per_group["correct"], per_group["total"])]
    present = [g for g, a in enumerate(accs) if a is not None]
    if not present:
        return {"worst_group": None, "mean_group_acc": None, "per_group_acc": accs, "groups_evaluated": 0}
    g = min(present, key=lambda i: (accs[i], i))
    return {"worst_group": {"acc": accs[g], "group": g, "name": names[g] if names else None,
                            "correct": int(per_group["correct"][g]), "n": int(per_group["total"][g])},
            "mean_group_acc": _mean(accs), "per_group_acc": accs, "groups_evaluated": len(present),
            "groups_without_examples": [i for i, a in enumerate(accs) if a is None]}


def breakdown(record: Mapping[str, Any], shots: Mapping[str, Any],
              group_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Every metric of one accuracy record (module docstring)."""
    pc = record.get("per_class")
    if not pc:
        raise ValueError("accuracy record without per_class counts: re-evaluate the cell")
    per_class = [_acc(k, n) for k, n in zip(pc["correct"], pc["total"])]
    if len(per_class) != len(shots["train_class_counts"]):
        raise ValueError(f"{len(per_class)} classes in the evaluation, {len(shots['train_class_counts'])} "
                         "in the train class counts")
    present = [c for c, a in enumerate(per_class) if a is not None]
    worst_c = min(present, key=lambda c: (per_class[c], c)) if present else None
    out: Dict[str, Any] = {
        "top1": _acc(sum(pc["correct"]), sum(pc["total"])), "correct": sum(pc["correct"]), "n": sum(pc["total"]),
        "per_class_acc": per_class, "mean_class_acc": _mean(per_class),
        "worst_class": None if worst_c is None else {"class": worst_c, "acc": per_class[worst_c],
                                                     "n": int(pc["total"][worst_c])}}
    for bucket, classes in shots["classes"].items():
        out[bucket] = {"acc": _mean([per_class[c] for c in classes]), "classes": list(classes),
                       "n": sum(int(pc["total"][c]) for c in classes)}
    if record.get("per_group"):
        out.update(worst_group(record["per_group"], group_names))
    if record.get("calibration"):
        cal = expected_calibration_error(record["calibration"])
        out["ece"], out["mce"] = cal["ece"], cal["mce"]
    return out


def accuracy_records(eval_record: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """Every accuracy record of an evaluation: ``clean``, each attack label, ``AutoAttack`` and
    ``AutoAttack subset: <PGD label>``."""
    out = dict(eval_record["metrics"])
    aa = eval_record.get("autoattack")
    if aa:
        out["AutoAttack"] = aa
        if aa.get("pgd_same_subset"):
            out[f"AutoAttack subset: {aa['pgd_same_subset'].get('label', 'PGD')}"] = aa["pgd_same_subset"]
    return out


def train_class_counts(train_record: Mapping[str, Any]) -> List[int]:
    try:
        return [int(n) for n in train_record["data"]["splits"]["train"]["class_counts"]]
    except (KeyError, TypeError):
        raise ValueError("train.json has no data.splits.train.class_counts (the dataset manifest); "
                         "retrain or re-prepare with the current code") from None


def summarize(eval_record: Mapping[str, Any], train_record: Mapping[str, Any], scale: str = "head"
              ) -> Dict[str, Any]:
    """Shot buckets, groups and :func:`breakdown` of every accuracy record of one evaluation."""
    shots = shot_thresholds(train_class_counts(train_record), scale)
    groups = (train_record.get("data") or {}).get("groups")
    names = groups.get("names") if groups else None
    return {"dataset": eval_record["cell"]["dataset"]["name"],
            "checkpoint": eval_record["checkpoint"]["name"],
            "shots": shots,
            "groups": {"num_groups": groups["num_groups"], "names": names,
                       "definition": groups.get("definition")} if groups else None,
            "results": {label: breakdown(rec, shots, names) for label, rec in accuracy_records(eval_record).items()}}


def summarize_file(eval_path: Path, train_path: Optional[Path] = None, scale: str = "head") -> Dict[str, Any]:
    """:func:`summarize` of an ``eval_*.json`` and (default) the ``train.json`` beside it."""
    eval_path = Path(eval_path)
    train_path = Path(train_path) if train_path else eval_path.with_name("train.json")
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path} (the train.json beside {eval_path}) is needed for the train "
                                "class counts")
    summary = summarize(json.loads(eval_path.read_text()), json.loads(train_path.read_text()), scale)
    summary["eval_file"] = str(eval_path)
    return summary


def headline(summary: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """Flat columns: for every record label ``L``: ``L``, ``L many``, ``L medium``, ``L few``,
    ``L worst-group`` (where groups exist); plus ``ECE`` of the clean predictions."""
    out: Dict[str, Optional[float]] = {}
    for label, r in summary["results"].items():
        out[label] = r["top1"]
        for bucket in ("many", "medium", "few"):
            out[f"{label} {bucket}"] = r[bucket]["acc"]
        if "worst_group" in r:
            out[f"{label} worst-group"] = r["worst_group"]["acc"] if r["worst_group"] else None
    clean = summary["results"].get("clean", {})
    if "ece" in clean:
        out["ECE"] = clean["ece"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m methods.lt_metrics", description=__doc__.splitlines()[0])
    p.add_argument("eval_json", type=Path)
    p.add_argument("--train-json", type=Path, default=None)
    p.add_argument("--scale", choices=sorted(SCALES), default="head")
    args = p.parse_args(argv)
    print(json.dumps(summarize_file(args.eval_json, args.train_json, args.scale), indent=2))


if __name__ == "__main__":
    main()
