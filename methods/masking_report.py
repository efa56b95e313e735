"""Gradient-masking report per model, computed only from evaluation result files.  No torch.

A model whose single-step (FGSM) accuracy is far above what a strong multi-step attack or
AutoAttack leaves is not robust: its gradients point the wrong way near the data (masking,
obfuscated gradients, catastrophic overfitting), so FGSM numbers overstate it.  For every
evaluation file, and within it for the undefended model and every evaluation-time defence x
attack mode present (:func:`methods.eps_curves.metric_key_parts`), the report lists:

* **AutoAttack's own warnings** (``autoattack.warnings``: the package's checks for randomness,
  zero gradients, Square Attack beating the gradient attacks, and the adapter's notes);
* **FGSM - PGD**: at every eps (and norm) where the evaluation has both, FGSM's accuracy minus
  the lowest untargeted PGD accuracy at that eps (same test examples); the largest gap is shown;
* **FGSM - AutoAttack**: FGSM at the evaluation's eps minus AutoAttack's accuracy (AutoAttack
  runs on a class-stratified subset, FGSM on the evaluated split, so only the intervals are
  compared);
* **PGD - AutoAttack on the same subset** (``autoattack.pgd_same_subset``, example for
  example) and ``robust_to_aa_not_pgd``, examples AutoAttack left standing that PGD broke;
* **non-monotone curves**: on any FGSM/PGD curve over eps (:func:`methods.eps_curves.curves`,
  eps 0 = clean), a larger eps whose 95% interval lies entirely above a smaller eps's interval;
* **robust above clean**: an untargeted attack's accuracy more than
  :data:`ROBUST_ABOVE_CLEAN_POINTS` above the clean accuracy of the same examples;
* **targeted weaker than expected**: PGD with ``targeted: all`` (every wrong class in turn, an
  example robust only if no target is reached) whose interval lies entirely above the untargeted
  PGD of the same steps, restarts and eps (the multi-targeted attack should be at least as
  strong).  Random and least-likely targets have no such expectation and are not judged.

Verdict (thresholds are these named constants, all in percentage points, and a gap counts only
when the two 95% intervals do not overlap):

* ``masking``: FGSM - AutoAttack > :data:`MASKING_GAP_POINTS` (20), or FGSM - PGD >
  :data:`MASKING_GAP_POINTS` at some eps.  Single-step accuracy is far above what the model
  withstands; the seed's BatchOut model (FGSM 52%, PGD 2-3%, AutoAttack 0.8%) is this case.
* ``suspect``: no such gap, but at least one sign: AutoAttack warnings, FGSM - PGD >
  :data:`FGSM_PGD_SIGN_POINTS` (10), PGD - AutoAttack on the same subset >
  :data:`PGD_AA_GAP_POINTS` (5), ``robust_to_aa_not_pgd`` > 0, a non-monotone curve, robust
  above clean, targeted weaker than expected.
* ``no sign``: at least one comparison could be made and nothing above fired.
* ``n/a``: nothing to compare (no FGSM beside a PGD or AutoAttack, no AutoAttack subset PGD,
  no curve of three points or more).

A ``masking`` verdict says that single-step numbers of this model must not be read as
robustness, not that the method was meant to mask.  Missing inputs are ``n/a``, never errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .attack_specs import format_eps
from .eps_curves import CurveKey, Point, curves, model_name, short_names
from .results import atomic_write_text, read_result

#: FGSM - AutoAttack or FGSM - PGD above this (non-overlapping intervals): verdict ``masking``.
MASKING_GAP_POINTS = 20.0
#: FGSM - PGD above this (non-overlapping intervals): a sign.
FGSM_PGD_SIGN_POINTS = 10.0
#: PGD - AutoAttack on the same subset above this: a sign.
PGD_AA_GAP_POINTS = 5.0
#: An untargeted attack's accuracy above clean by more than this: a sign.
ROBUST_ABOVE_CLEAN_POINTS = 1.0
#: A curve needs this many points (eps 0 included) for the monotonicity check to count as a
#: comparison made.
MONOTONE_MIN_POINTS = 3
VERDICTS = ("masking", "suspect", "no sign", "n/a")
NA = "n/a"


@dataclass(frozen=True)
class Gap:
    """``a - b`` in percentage points, whether the 95% intervals are apart (a's lower bound
    above b's upper bound), and where: eps, norm and the labels compared."""

    points: float
    apart: bool
    eps: float
    norm: str
    what: str

    def text(self) -> str:
        return f"{self.points:+.1f}{'' if self.apart else ' (CIs overlap)'}"


def _gap(a: Point, b: Point, norm: str, what: str) -> Gap:
    return Gap(round(100 * (a.acc - b.acc), 6), a.ci_low > b.ci_high, a.eps, norm, what)


def _aa_point(block: Mapping[str, Any], eps: float) -> Optional[Point]:
    if not block or block.get("acc") is None or None in (block.get("ci95") or [None]):
        return None
    lo, hi = block["ci95"]
    return Point(eps, float(block["acc"]), float(lo), float(hi), int(block.get("n", 0)),
                 block.get("label", "AutoAttack"))


def _untargeted_pgd(family: str) -> bool:
    return family.startswith("PGD-") and "targeted=" not in family


def _groups(ev: Mapping[str, Any]) -> List[Tuple[Optional[str], Optional[str]]]:
    groups: List[Tuple[Optional[str], Optional[str]]] = [(None, None)]
    for ck in curves(ev):
        if (ck.defense, ck.mode) not in groups:
            groups.append((ck.defense, ck.mode))
    return groups


def assess_group(ev: Mapping[str, Any], defense: Optional[str] = None,
                 mode: Optional[str] = None) -> Dict[str, Any]:
    """The report's row for one model (``defense`` ``None``: undefended) of one evaluation
    record: values as numbers (fractions for accuracies, points for gaps), lists of signs,
    ``masking_reasons``, ``signs`` and the ``verdict`` (module docstring)."""
    threat = ev.get("threat") or {}
    norm = {"linf": "Linf", "l2": "L2"}.get(str(threat.get("norm", "")).lower(), "")
    eps = float(threat["eps"]) if threat.get("eps") is not None else None
    mine = {ck: pts for ck, pts in curves(ev).items() if (ck.defense, ck.mode) == (defense, mode)}
    clean = next((p for pts in mine.values() for p in pts if p.eps == 0.0), None)
    if clean is None and defense is None:
        m = (ev.get("metrics") or {}).get("clean") or {}
        lo, hi = m.get("ci95") or (None, None)
        if m.get("acc") is not None and lo is not None and hi is not None:
            clean = Point(0.0, float(m["acc"]), float(lo), float(hi), int(m.get("n", 0)), "clean")

    def at(ck: CurveKey, e: float) -> Optional[Point]:
        return next((p for p in mine[ck]
                     if p.eps > 0 and abs(p.eps - e) <= 1e-9 * max(1.0, e)), None)

    fgsm_keys = [ck for ck in mine if ck.family == "FGSM"]
    pgd_keys = [ck for ck in mine if _untargeted_pgd(ck.family)]

    def strongest_pgd(e: float, n: str) -> Optional[Point]:
        pts = [p for ck in pgd_keys if ck.norm == n for p in [at(ck, e)] if p is not None]
        return min(pts, key=lambda p: p.acc) if pts else None

    # FGSM and PGD at the evaluation's own eps, and FGSM - PGD at every shared eps.
    fgsm = next((at(ck, eps) for ck in fgsm_keys if ck.norm == norm and eps is not None
                 and at(ck, eps) is not None), None)
    pgd = strongest_pgd(eps, norm) if eps is not None else None
    fgsm_pgd: List[Gap] = []
    for ck in fgsm_keys:
        for p in mine[ck]:
            q = strongest_pgd(p.eps, ck.norm) if p.eps > 0 else None
            if q is not None:
                fgsm_pgd.append(_gap(p, q, ck.norm, f"{p.labels} vs {q.labels}"))
    worst_fp = max(fgsm_pgd, key=lambda g: (g.apart, g.points), default=None)

    # AutoAttack (the undefended model's; a defence's own AutoAttack is not in this block).
    aa_block = ev.get("autoattack") if defense is None else None
    aa = _aa_point(aa_block or {}, eps or 0.0)
    fgsm_aa = _gap(fgsm, aa, norm, "FGSM vs AutoAttack") if fgsm and aa else None
    same = (aa_block or {}).get("pgd_same_subset") if aa else None
    pgd_aa = (round(100 * (same["acc"] - aa.acc), 6)
              if same and same.get("acc") is not None else None)
    aa_not_pgd = same.get("robust_to_aa_not_pgd") if same else None
    warnings = list((aa_block or {}).get("warnings") or [])

    # Curves: non-monotone beyond the intervals, robust above clean, targeted=all too weak.
    non_monotone, above_clean, targeted_weak = [], [], []
    for ck, pts in mine.items():
        rises = [(a, b) for i, a in enumerate(pts) for b in pts[i + 1:]
                 if b.eps > a.eps and b.ci_low > a.ci_high]
        worst = max(rises, key=lambda ab: ab[1].acc - ab[0].acc, default=None)
        if worst:
            a, b = worst
            non_monotone.append(f"{ck.family} {ck.norm}: {100 * b.acc:.1f}% at eps "
                                f"{format_eps(b.eps)} above {100 * a.acc:.1f}% at eps "
                                f"{format_eps(a.eps) if a.eps else '0 (clean)'}")
        if clean is not None and "targeted=" not in ck.family:
            for p in pts:
                if p.eps > 0 and 100 * (p.acc - clean.acc) > ROBUST_ABOVE_CLEAN_POINTS:
                    above_clean.append(f"{p.labels}: {100 * p.acc:.1f}% vs clean "
                                       f"{100 * clean.acc:.1f}%")
        if "targeted=all" in ck.family:
            twin = CurveKey(ck.defense, ck.mode, ck.family.replace("-targeted=all", ""), ck.norm)
            for p in pts:
                q = at(twin, p.eps) if twin in mine and p.eps > 0 else None
                if q is not None and p.ci_low > q.ci_high:
                    targeted_weak.append(f"{p.labels}: {100 * p.acc:.1f}% above untargeted "
                                         f"{100 * q.acc:.1f}%")

    masking_reasons, signs = [], []
    if fgsm_aa and fgsm_aa.apart and fgsm_aa.points > MASKING_GAP_POINTS:
        masking_reasons.append(f"FGSM - AutoAttack = {fgsm_aa.points:.1f} points")
    if worst_fp and worst_fp.apart and worst_fp.points > MASKING_GAP_POINTS:
        masking_reasons.append(f"FGSM - PGD = {worst_fp.points:.1f} points at eps "
                               f"{format_eps(worst_fp.eps)}")
    if warnings:
        signs.append(f"AutoAttack warnings ({len(warnings)})")
    if worst_fp and worst_fp.apart and FGSM_PGD_SIGN_POINTS < worst_fp.points <= MASKING_GAP_POINTS:
        signs.append(f"FGSM - PGD = {worst_fp.points:.1f} points")
    if pgd_aa is not None and pgd_aa > PGD_AA_GAP_POINTS:
        signs.append(f"PGD - AutoAttack = {pgd_aa:.1f} points on the same subset")
    if aa_not_pgd:
        signs.append(f"{aa_not_pgd} examples robust to AutoAttack but not to PGD")
    signs += [f"non-monotone: {s}" for s in non_monotone]
    signs += [f"robust above clean: {s}" for s in above_clean]
    signs += [f"targeted weaker than untargeted: {s}" for s in targeted_weak]
    compared = (fgsm_aa is not None or bool(fgsm_pgd) or pgd_aa is not None
                or any(len(p) >= MONOTONE_MIN_POINTS for p in mine.values()))
    verdict = ("masking" if masking_reasons else "suspect" if signs
               else "no sign" if compared else NA)
    return {
        **model_name(ev), "defense": defense or "", "mode": mode or "",
        "norm": norm, "eps": eps,
        "clean_acc": clean.acc if clean else None,
        "clean_ci": [clean.ci_low, clean.ci_high] if clean else None,
        "fgsm_acc": fgsm.acc if fgsm else None,
        "fgsm_ci": [fgsm.ci_low, fgsm.ci_high] if fgsm else None,
        "pgd_acc": pgd.acc if pgd else None, "pgd_label": pgd.labels if pgd else None,
        "pgd_ci": [pgd.ci_low, pgd.ci_high] if pgd else None,
        "autoattack_acc": aa.acc if aa else None, "autoattack_n": aa.n if aa else None,
        "autoattack_ci": [aa.ci_low, aa.ci_high] if aa else None,
        "autoattack_version": (aa_block or {}).get("version") if aa else None,
        "autoattack_warnings": warnings,
        "fgsm_minus_pgd": worst_fp.points if worst_fp else None,
        "fgsm_minus_pgd_apart": worst_fp.apart if worst_fp else None,
        "fgsm_minus_pgd_eps": worst_fp.eps if worst_fp else None,
        "fgsm_minus_aa": fgsm_aa.points if fgsm_aa else None,
        "fgsm_minus_aa_apart": fgsm_aa.apart if fgsm_aa else None,
        "pgd_minus_aa_same_subset": pgd_aa,
        "pgd_same_subset_label": same.get("label") if same else None,
        "robust_to_aa_not_pgd": aa_not_pgd,
        "non_monotone": non_monotone, "robust_above_clean": above_clean,
        "targeted_weaker": targeted_weak,
        "masking_reasons": masking_reasons, "signs": signs, "verdict": verdict,
    }


def assess(ev: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Rows for one evaluation record: the undefended model first, then each defence x mode."""
    return [assess_group(ev, d, m) for d, m in _groups(ev)]


def verdict(ev: Mapping[str, Any]) -> str:
    """The undefended model's verdict (the main table's column)."""
    return assess_group(ev)["verdict"]


# ----------------------------------------------------------------------------- rendering

def _pct(acc: Optional[float], ci: Optional[List[float]] = None) -> str:
    if acc is None:
        return NA
    return f"{100 * acc:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _points(value: Optional[float], apart: Optional[bool] = None) -> str:
    if value is None:
        return NA
    return f"{value:+.1f}" + (" (CIs overlap)" if apart is False else "")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


CAPTION = (
    f"Gradient-masking report, from the evaluation files only.  Accuracies in % with exact 95% "
    f"intervals; gaps in percentage points.  FGSM and PGD are at the evaluation's eps (PGD: the "
    f"lowest untargeted PGD there); FGSM - PGD is the largest gap at any eps both were run at; "
    f"AutoAttack runs on a class-stratified subset of n examples, with PGD on the same examples "
    f"(PGD - AA).  Verdict **masking**: FGSM - AutoAttack or FGSM - PGD above "
    f"{MASKING_GAP_POINTS:g} points with non-overlapping 95% intervals (single-step numbers "
    f"overstate this model's robustness).  **suspect**: a sign without such a gap (AutoAttack "
    f"warnings; FGSM - PGD above {FGSM_PGD_SIGN_POINTS:g} points; PGD - AutoAttack above "
    f"{PGD_AA_GAP_POINTS:g} points on the same subset; examples robust to AutoAttack but not to "
    f"PGD; accuracy rising with eps beyond the intervals; robust above clean by more than "
    f"{ROBUST_ABOVE_CLEAN_POINTS:g} point; targeted=all weaker than untargeted).  **no sign**: "
    f"compared, nothing fired.  n/a: nothing to compare.")


def render_markdown(rows: List[Dict[str, Any]]) -> str:
    names = short_names(rows)
    head = ["model", "defence", "clean", "FGSM", "PGD", "AutoAttack (n)", "FGSM - PGD",
            "FGSM - AA", "PGD - AA (same subset)", "AA warnings", "non-monotone", "other signs",
            "verdict"]
    lines = [CAPTION, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, name in zip(rows, names):
        other = [s for s in r["signs"] if not s.startswith(("non-monotone", "AutoAttack warnings"))]
        cells = [
            name, " | ".join(p for p in (r["defense"], r["mode"]) if p) or "none",
            _pct(r["clean_acc"], r["clean_ci"]), _pct(r["fgsm_acc"], r["fgsm_ci"]),
            _pct(r["pgd_acc"], r["pgd_ci"]) + (f" {r['pgd_label']}" if r["pgd_label"] else ""),
            (f"{_pct(r['autoattack_acc'], r['autoattack_ci'])} ({r['autoattack_n']})"
             if r["autoattack_acc"] is not None else NA),
            _points(r["fgsm_minus_pgd"], r["fgsm_minus_pgd_apart"])
            + (f" at eps {format_eps(r['fgsm_minus_pgd_eps'])}"
               if r["fgsm_minus_pgd"] is not None else ""),
            _points(r["fgsm_minus_aa"], r["fgsm_minus_aa_apart"]),
            _points(r["pgd_minus_aa_same_subset"])
            + (f" (robust to AA not PGD: {r['robust_to_aa_not_pgd']})"
               if r["robust_to_aa_not_pgd"] else ""),
            ("; ".join(r["autoattack_warnings"]) if r["autoattack_warnings"]
             else ("none" if r["autoattack_acc"] is not None else NA)),
            "; ".join(r["non_monotone"]) or "no",
            "; ".join(other) or "none",
            f"**{r['verdict']}**" if r["verdict"] in ("masking", "suspect") else r["verdict"],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["(no evaluation files)"] + [NA] * (len(head) - 1)) + " |")
    return "\n".join(lines) + "\n"


CSV_LISTS = ("autoattack_warnings", "non_monotone", "robust_above_clean", "targeted_weaker",
             "masking_reasons", "signs")


def report_rows(records: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    key = lambda r: (r["dataset"], r["arch"], r["recipe"], r["seed"], r["checkpoint"],
                     r["defense"], r["mode"])
    return sorted((row for ev in records for row in assess(ev)), key=key)


def write_report(records: List[Mapping[str, Any]], markdown: Path,
                 csv: Path) -> List[Dict[str, Any]]:
    """Write the Markdown and CSV report of evaluation records; return the rows."""
    import pandas as pd

    rows = report_rows(records)
    flat = []
    for r in rows:
        f = {k: ("; ".join(v) if k in CSV_LISTS else v) for k, v in r.items()
             if not k.endswith("_ci")}
        for k in ("clean_ci", "fgsm_ci", "pgd_ci", "autoattack_ci"):
            f[f"{k}_low"], f[f"{k}_high"] = r[k] if r[k] else (None, None)
        flat.append(f)
    columns = list(flat[0]) if flat else ["dataset", "arch", "recipe", "seed", "checkpoint",
                                          "defense", "mode", "verdict"]
    frame = pd.DataFrame(flat, columns=columns)
    for k in ("autoattack_n", "robust_to_aa_not_pgd"):
        if k in frame:
            frame[k] = frame[k].astype("Int64")
    atomic_write_text(Path(csv), frame.to_csv(index=False))
    atomic_write_text(Path(markdown), render_markdown(rows))
    return rows


def masking_report(eval_paths: List[Path], markdown: Path, csv: Path) -> List[Dict[str, Any]]:
    """:func:`write_report` of the evaluation files ``eval_paths`` (schema-checked)."""
    return write_report([read_result(Path(p), "eval_result.schema.json") for p in eval_paths],
                        markdown, csv)
