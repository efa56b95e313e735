"""This run's cells grouped over seeds, and the number a published row names read from them.
No torch.

A :class:`RunGroup` is the seeds of one (dataset, arch, method, recipe, checkpoint) of the run
(:func:`group_rows` over :func:`methods.tables.rows_from_results`).  :func:`measure` reads from a
group the number a published row's ``metric_kind`` names (:data:`METRIC_SOURCES`): ``clean_acc``
the clean accuracy; ``robust_acc`` with ``attack_name`` ``pgd`` / ``fgsm`` an evaluated attack of
that kind with the row's steps (PGD; required), and its restarts, eps, norm and targeting where
the row gives them (:data:`ATTACK_SOURCES`); ``autoattack`` the AutoAttack subset;
``top1_error`` / ``robust_error`` one minus those.  It returns a :class:`Measured` (each seed's
accuracy and example count), or the reason it cannot: the attack was not evaluated, the row is
about an evaluation-time defence (:data:`DEFENCE_PROTOCOLS`), or the metric is not an accuracy
(a gain, a time, a speed-up).  :func:`group_metrics` reads every metric of a group for the
This-run section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Union

import pandas as pd

from .paper_tables_band import Band, band

#: threat_protocol of a row about an attack on an evaluation-time defence (Mixup Inference's
#: tables): not matched to the plain attack metrics.
DEFENCE_PROTOCOLS = ("oblivious", "adaptive")


# ----------------------------------------------------------------------------- run cells
@dataclass
class RunGroup:
    """The seeds of one (dataset, arch, method, recipe, checkpoint) of this run."""
    dataset: str
    arch: str
    method: str
    recipe: str
    checkpoint: str
    rows: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def cell(self) -> Dict[str, Any]:
        return self.rows[0]["_cell"]

    @property
    def cell_id(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.recipe}"

    @property
    def seeds(self) -> List[int]:
        return sorted(r["seed"] for r in self.rows)

    @property
    def n_test(self) -> Optional[int]:
        return self.rows[0].get("n_test")


def group_rows(rows: List[Dict[str, Any]]) -> List[RunGroup]:
    """The rows of :func:`methods.tables.rows_from_results` grouped over seeds, sorted by key."""
    groups: Dict[tuple, RunGroup] = {}
    for r in rows:
        key = (r["dataset"], r["arch"], r["method"], r["recipe"], r["checkpoint"])
        groups.setdefault(key, RunGroup(*key)).rows.append(r)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    """One number of a run group: the label read and each seed's (accuracy, examples)."""
    label: str
    accs: List[float]
    totals: List[int]
    seeds: List[int]
    subset_n: Optional[int] = None   # AutoAttack on a subset smaller than the test set

    @property
    def band(self) -> Band:
        return band(self.accs, self.totals)


#: What a reader returns: the number read, or why there is none (the verdict's reason).
Reading = Union[Measured, str]
#: A reader: (published row, run group) -> :data:`Reading`.
Reader = Callable[[Mapping[str, Any], RunGroup], Reading]


def has_value(v: Any) -> bool:
    """Whether a published cell holds a value (not None, NaN, pd.NA or blank)."""
    if v is None:
        return False
    try:
        if pd.isna(v):
            return False
    except (TypeError, ValueError):
        pass
    return str(v).strip() != ""


def value_text(v: Any) -> str:
    """A published cell as stripped text; ``""`` when it holds no value."""
    return str(v).strip() if has_value(v) else ""


def _collect(group: RunGroup, label: str,
             get: Callable[[Dict[str, Any]], Optional[Mapping]]) -> Optional[Measured]:
    """The metric ``get`` picks from each seed's row, over the seeds that have it."""
    accs, totals, seeds, subset = [], [], [], None
    for r in sorted(group.rows, key=lambda r: r["seed"]):
        m = get(r)
        if not m or m.get("acc") is None or not m.get("n"):
            continue
        accs.append(float(m["acc"]))
        totals.append(int(m["n"]))
        seeds.append(r["seed"])
    return Measured(label, accs, totals, seeds, subset) if accs else None


def _clean(row: Mapping[str, Any], group: RunGroup) -> Reading:
    got = _collect(group, "clean", lambda r: r["_metrics"].get("clean"))
    return got or "no clean accuracy in the result files"


def _norm(text: str) -> str:
    return text.lower().replace("-", "").replace(" ", "").replace("_", "")


def _targeted_ok(row_value: Any, spec_value: Any) -> bool:
    want = value_text(row_value).lower()
    if want in ("", "none", "false", "no", "0", "untargeted", "n/a"):
        return spec_value is None
    if want in ("true", "yes", "1", "targeted"):
        return spec_value is not None
    return spec_value == want


def _attack_matcher(name: str) -> Reader:
    """Reader of an evaluated ``name`` (pgd / fgsm) attack matching the row's steps (PGD),
    restarts, eps, norm and targeting; the step size only breaks ties."""
    def read(row: Mapping[str, Any], group: RunGroup) -> Reading:
        steps = row.get("attack_steps")
        if name == "pgd" and not has_value(steps):
            return "attack not evaluated: the row states no PGD step count"
        eps = (row.get("eps_value") if has_value(row.get("eps_value"))
               else float(group.cell["threat"]["eps"]))
        step_counts = {int(float(s)) for s in (steps, row.get("attack_steps_alt")) if has_value(s)}

        def fits(label: str, m: Mapping[str, Any]) -> bool:
            spec, threat = m.get("attack") or {}, m.get("threat") or {}
            if "defense" in m or " | " in label or spec.get("name") != name:
                return False
            if name == "pgd" and int(spec.get("steps", -1)) not in step_counts:
                return False
            if has_value(row.get("attack_restarts")) and name == "pgd" and \
                    int(spec.get("restarts", 1)) != int(float(row["attack_restarts"])):
                return False
            if abs(float(threat.get("eps", -1)) - float(eps)) > 1e-9 * max(1.0, float(eps)):
                return False
            if has_value(row.get("norm")) and \
                    _norm(str(row["norm"])) != _norm(str(threat.get("norm"))):
                return False
            return _targeted_ok(row.get("attack_targeted"), spec.get("targeted"))

        count: Dict[str, int] = {}
        alpha_ok: Dict[str, bool] = {}
        for r in group.rows:
            for label, m in r["_metrics"].items():
                if label != "clean" and fits(label, m):
                    count[label] = count.get(label, 0) + 1
                    a = (m.get("attack") or {}).get("alpha")
                    alpha_ok[label] = (has_value(row.get("attack_step_size")) and a is not None
                                       and abs(float(a) - float(row["attack_step_size"])) < 1e-9)
        if not count:
            what = f"{name.upper()}" + (f"-{int(float(steps))}" if name == "pgd" else "")
            if has_value(row.get("attack_restarts")) and name == "pgd":
                what += f" with {int(float(row['attack_restarts']))} restarts"
            targeted = value_text(row.get("attack_targeted"))
            what += f" (targeted: {targeted})" if targeted else ""
            return f"attack not evaluated: {what} at eps {float(eps):.6g}"
        label = sorted(count, key=lambda l: (-count[l], not alpha_ok[l], l))[0]
        got = _collect(group, label, lambda r: r["_metrics"].get(label))
        return got  # type: ignore[return-value]
    return read


def _autoattack(row: Mapping[str, Any], group: RunGroup) -> Reading:
    got = _collect(group, "AutoAttack", lambda r: r["_aa"])
    if got is None:
        return "attack not evaluated: AutoAttack was not run for this cell"
    n_aa = min(got.totals)
    if group.n_test and n_aa < group.n_test:
        got.subset_n = n_aa
    version = (group.rows[0]["_aa"] or {}).get("version")
    got.label = f"AutoAttack ({version})" if version else "AutoAttack"
    return got


#: attack_name of a robust_acc row -> its reader; any other attack is not evaluated here.
ATTACK_SOURCES: Dict[str, Reader] = {
    "pgd": _attack_matcher("pgd"), "fgsm": _attack_matcher("fgsm"), "autoattack": _autoattack}


def _robust(row: Mapping[str, Any], group: RunGroup) -> Reading:
    name = value_text(row.get("attack_name")).lower()
    protocol = value_text(row.get("threat_protocol")).lower()
    if protocol in DEFENCE_PROTOCOLS:
        return (f"attack not evaluated: a {protocol} attack on an evaluation-time defence "
                f"({value_text(row.get('method'))}; defence metrics are not matched to "
                "published rows)")
    reader = ATTACK_SOURCES.get(name)
    if reader is None:
        return (f"attack not evaluated: {name or 'attack unspecified'} "
                f"({value_text(row.get('attack'))})")
    return reader(row, group)


def _error(reader: Reader):
    """The error rate (1 - accuracy, same binomial variance) of what ``reader`` reads."""
    def read(row: Mapping[str, Any], group: RunGroup) -> Reading:
        got = reader(row, group)
        if isinstance(got, Measured):
            got = Measured(f"{got.label} error", [1 - a for a in got.accs], got.totals,
                           got.seeds, got.subset_n)
        return got
    return read


#: metric_kind -> reader of the matching number of a run group; any other kind (a gain, a
#: time, a speed-up, a relative error increase) is not comparable.
METRIC_SOURCES: Dict[str, Reader] = {
    "clean_acc": _clean, "robust_acc": _robust, "top1_error": _error(_clean),
    "robust_error": _error(_robust)}


def measure(row: Mapping[str, Any], group: RunGroup) -> Reading:
    """The number published ``row`` names, read from ``group``, or why it cannot be read."""
    kind = value_text(row.get("metric_kind"))
    reader = METRIC_SOURCES.get(kind)
    if reader is None:
        return (f"metric {kind or 'unstated'} ({value_text(row.get('metric'))}) is not an accuracy "
                "this suite evaluates per cell")
    return reader(row, group)


def group_metrics(group: RunGroup, hidden: Set[str]) -> List[Measured]:
    """Every metric of ``group`` but the ``hidden`` labels, in order of first appearance, then
    its AutoAttack where it was run."""
    labels: List[str] = []
    for r in group.rows:
        labels += [l for l in r["_metrics"] if l not in labels and l not in hidden]
    measured = [_collect(group, l, lambda r, l=l: r["_metrics"].get(l)) for l in labels]
    aa = _autoattack({}, group)
    measured.append(aa if isinstance(aa, Measured) else None)
    return [m for m in measured if m is not None]
