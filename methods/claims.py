"""The seed papers' headline claims, tested as paired comparisons over seeds.  No torch.

The claims and the rules are in ``paper_tables/published/claims.yaml`` (its header is the
specification; :data:`DIRECTIONS` and :func:`judge` implement it).  In short: a test compares
side ``a`` with side ``b``; each side selects cells by ``method`` and a subset of
``method_args`` (or ``one_of`` such selections) and reads one metric (:func:`metric_value`);
cells pair within a context (dataset, arch, threat eps, the training block, the ``same``
method_args) by seed; per seed d = a - b; the mean of d and its 95% t-interval over the n seeds
give the verdict.  Nothing here picks a side or a number by hand: every value comes from the result
files (:func:`methods.tables.rows_from_results`), and a claim whose cells are not in the run is
reported as "not run", never left out.

Outputs (:func:`write_claims`): the claims table as Markdown (a summary per claim, then one row
per test x context with the per-seed values), CSV (numbers as numbers; the columns
:data:`CSV_COLUMNS`, read by :mod:`methods.plots`) and LaTeX.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
import yaml
from scipy import stats

from .lt_metrics import headline, summarize
from .results import atomic_write_text
from .tables import rows_from_results
from .text_escape import md_cell, tex_escape

VERDICTS = ("holds", "fails", "inconclusive", "not run")
DIRECTIONS = ("greater", "less", "equivalent", "at_most")
METRICS = ("clean", "fgsm", "pgd", "autoattack", "few_shot", "passes")
CSV_COLUMNS = ["claim_id", "seed_paper", "claim", "test_id", "test", "role", "context", "side_a",
               "side_b", "metric", "n_seeds", "seeds", "values_a", "values_b", "diff_mean",
               "ci_low", "ci_high", "margin", "direction", "verdict", "reason", "co_seeds_a",
               "co_seeds_b"]


class ClaimsError(ValueError):
    """A malformed claims file: the message names the claim, the test and the field."""


# --------------------------------------------------------------------------- the definitions
def load_claims(path: Path) -> Dict[str, Any]:
    """The claims file, checked: every field a test needs, known directions and metrics."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("claims"), list):
        raise ClaimsError(f"{path}: needs a top-level list 'claims'")
    seen = set()
    for c in doc["claims"]:
        for key in ("id", "seed_paper", "claim", "source", "tests"):
            if key not in c:
                raise ClaimsError(f"{path}: claim {c.get('id')!r} has no {key!r}")
        if c["id"] in seen:
            raise ClaimsError(f"{path}: claim id {c['id']!r} is defined twice")
        seen.add(c["id"])
        if c.get("verdict_from", "all") not in ("all", "largest_eps"):
            raise ClaimsError(f"{path}: claim {c['id']!r}: verdict_from {c['verdict_from']!r} "
                              "is not one of ['all', 'largest_eps']")
        for t in c["tests"]:
            where = f"{path}: claim {c['id']!r} test {t.get('id')!r}"
            for key in ("id", "a", "b", "direction"):
                if key not in t:
                    raise ClaimsError(f"{where}: missing {key!r}")
            if t["direction"] not in DIRECTIONS:
                raise ClaimsError(f"{where}: direction {t['direction']!r} is not one of {list(DIRECTIONS)}")
            if t["direction"] in ("equivalent", "at_most") and not isinstance(t.get("margin"), (int, float)):
                raise ClaimsError(f"{where}: direction {t['direction']!r} needs a numeric 'margin' (points)")
            for side in ("a", "b"):
                _check_side(t[side], f"{where} side {side}")
    return doc


def _check_side(side: Mapping[str, Any], where: str) -> None:
    if "metric" not in side or ("method" in side) == ("one_of" in side):
        raise ClaimsError(f"{where}: needs 'metric' and either 'method' or 'one_of'")
    for alt in side.get("one_of") or []:
        if not isinstance(alt, Mapping) or "method" not in alt or set(alt) - {"method", "method_args"}:
            raise ClaimsError(f"{where}: one_of entries are {{method, method_args}}, not {alt!r}")
    metric = side["metric"]
    if isinstance(metric, Mapping):
        if set(metric) != {"defense", "mode"} or metric["mode"] not in ("clean", "oblivious", "adaptive"):
            raise ClaimsError(f"{where}: metric {metric!r} must be {{defense: <label>, mode: "
                              "clean|oblivious|adaptive}")
    elif metric not in METRICS:
        raise ClaimsError(f"{where}: metric {metric!r} is not one of {list(METRICS)} or a defence")


# --------------------------------------------------------------------------- reading one cell
def _own_eps(m: Mapping[str, Any], eps: float) -> bool:
    return abs(float(m["threat"]["eps"]) - eps) <= 1e-9 * max(1.0, eps)


def _untargeted(attack: Mapping[str, Any]) -> bool:
    return attack.get("targeted") in (None, False, "none")


def metric_value(row: Mapping[str, Any], metric: Any) -> Optional[float]:
    """One cell's value of ``metric`` (accuracies in percent; passes as counted), or None when
    the evaluation did not measure it."""
    metrics = row["_metrics"]
    if metric == "clean":
        return 100 * metrics["clean"]["acc"]
    if metric in ("fgsm", "pgd"):
        eps = float(row["eps"])
        accs = [m["acc"] for label, m in metrics.items()
                if label != "clean" and "defense" not in m and m.get("attack", {}).get("name") == metric
                and _untargeted(m["attack"]) and _own_eps(m, eps)]
        return 100 * min(accs) if accs else None          # pgd: the strongest evaluated PGD
    if metric == "autoattack":
        return 100 * row["_aa"]["acc"] if row.get("_aa") else None
    if metric == "passes":
        if "train_fwd_per_example" not in row:
            return None
        return row["train_fwd_per_example"] + row["train_bwd_per_example"]
    if metric == "few_shot":
        if not row.get("_train"):
            return None
        try:
            few = headline(summarize(row["_record"], row["_train"])).get("clean few")
        except ValueError:
            return None
        return None if few is None else 100 * few
    if isinstance(metric, Mapping):                      # an evaluation-time defence
        accs = [m["acc"] for m in metrics.values()
                if (m.get("defense") or {}).get("label") == metric["defense"]
                and m.get("mode") == metric["mode"]]
        return 100 * min(accs) if accs else None
    raise ClaimsError(f"unknown metric {metric!r}")


def selects(row: Mapping[str, Any], side: Mapping[str, Any]) -> bool:
    """Whether the cell of ``row`` is on ``side``: its method, and its resolved method_args
    contain the side's ``method_args`` -- or any alternative of ``one_of`` (one baseline coded
    two ways, e.g. N-FGSM in eval mode as ``nfgsm`` or as BB with m = 1 and no selection)."""
    if "one_of" in side:
        return any(selects(row, alt) for alt in side["one_of"])
    if row["method"] != side["method"]:
        return False
    args = row["_cell"].get("method_args") or {}
    return all(args.get(k) == v for k, v in (side.get("method_args") or {}).items())


def metric_text(metric: Any) -> str:
    return f"{metric['defense']} {metric['mode']}" if isinstance(metric, Mapping) else str(metric)


def side_text(side: Mapping[str, Any]) -> str:
    if "one_of" in side:
        return " or ".join(side_text(alt) for alt in side["one_of"])
    args = ", ".join(f"{k}={v}" for k, v in (side.get("method_args") or {}).items())
    return side["method"] + (f" ({args})" if args else "")


# --------------------------------------------------------------------------- statistics
def paired_interval(diffs: Sequence[float], level: float = 0.95) -> Tuple[float, Optional[float], Optional[float]]:
    """Mean of the per-seed differences and its two-sided t-interval (None, None for one seed)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def judge(direction: str, low: Optional[float], high: Optional[float], n: int, min_seeds: int,
          margin: Optional[float] = None) -> Tuple[str, str]:
    """The verdict of one row and why (the rules of the claims file's header)."""
    if n < min_seeds or low is None:
        return "inconclusive", f"{n} seed(s); a verdict needs at least {min_seeds}"
    if direction == "greater":
        if low > 0:
            return "holds", "the 95% interval is above 0"
        if high < 0:
            return "fails", "the 95% interval is below 0"
        return "inconclusive", "the 95% interval contains 0"
    if direction == "less":
        if high < 0:
            return "holds", "the 95% interval is below 0"
        if low > 0:
            return "fails", "the 95% interval is above 0"
        return "inconclusive", "the 95% interval contains 0"
    if direction == "equivalent":
        if -margin <= low and high <= margin:
            return "holds", f"the 95% interval lies within +-{margin:g}"
        if low > margin or high < -margin:
            return "fails", f"the 95% interval lies outside +-{margin:g}"
        return "inconclusive", f"the 95% interval crosses +-{margin:g}"
    if direction == "at_most":
        if high < margin:
            return "holds", f"the 95% interval is below +{margin:g}"
        if low > margin:
            return "fails", f"the 95% interval is above +{margin:g}"
        return "inconclusive", f"the 95% interval contains +{margin:g}"
    raise ClaimsError(f"unknown direction {direction!r}")


# --------------------------------------------------------------------------- one test
def _context(row: Mapping[str, Any], same: Sequence[str], same_train: bool = True) -> Tuple:
    """Where two cells compare: dataset, arch, threat eps, the ``same`` method_args, and (unless
    the test sets ``same_train: false``) the training block -- epochs, batch, optimizer and
    schedule -- so a side never meets a cell trained under another budget or schedule."""
    args = row["_cell"].get("method_args") or {}
    train = json.dumps(row["_cell"].get("train"), sort_keys=True) if same_train else ""
    return (row["dataset"], row["arch"], float(row["eps"])) + tuple(
        json.dumps(args.get(k), sort_keys=True) for k in same) + (train,)


def _by_seed(rows: List[Mapping[str, Any]], side: Mapping[str, Any], same: Sequence[str],
             same_train: bool) -> Dict[Tuple, Dict[str, Dict[int, Mapping[str, Any]]]]:
    """context -> recipe -> seed -> row, for the rows on ``side``."""
    out: Dict[Tuple, Dict[str, Dict[int, Mapping[str, Any]]]] = {}
    for r in rows:
        if selects(r, side):
            out.setdefault(_context(r, same, same_train), {}).setdefault(r["recipe"], {})[int(r["seed"])] = r
    return out


def _context_text(ctx: Tuple, same: Sequence[str]) -> str:
    text = f"{ctx[0]} / {ctx[1]} / eps {ctx[2]:g}"
    return text + "".join(f" / {k}={json.loads(v)}" for k, v in zip(same, ctx[3:])
                          if json.loads(v) is not None)


def test_rows(claim: Mapping[str, Any], test: Mapping[str, Any], rows: List[Mapping[str, Any]],
              min_seeds: int) -> List[Dict[str, Any]]:
    """One row per context x recipe pair where both sides ran; one "not run" row otherwise."""
    same = test.get("same") or []
    a_side, b_side = test["a"], test["b"]
    metric = metric_text(a_side["metric"]) + (
        "" if a_side["metric"] == b_side["metric"] else f" vs {metric_text(b_side['metric'])}")
    base = {"claim_id": claim["id"], "seed_paper": claim["seed_paper"], "claim": claim["claim"],
            "test_id": test["id"], "test": f"{side_text(a_side)} - {side_text(b_side)}",
            "role": test.get("role", "test"), "metric": metric, "direction": test["direction"],
            "margin": test.get("margin")}
    same_train = test.get("same_train", True)
    a_cells, b_cells = (_by_seed(rows, a_side, same, same_train),
                        _by_seed(rows, b_side, same, same_train))
    one_selection = ({k: v for k, v in a_side.items() if k != "metric"}
                     == {k: v for k, v in b_side.items() if k != "metric"})
    out, unmeasured = [], 0
    for ctx in sorted(set(a_cells) & set(b_cells)):
        for ra, a_seeds in sorted(a_cells[ctx].items()):
            for rb, b_seeds in sorted(b_cells[ctx].items()):
                if one_selection and ra != rb:
                    continue        # two metrics of one cell: never one recipe's against another's
                if ra == rb and a_side["metric"] == b_side["metric"]:
                    continue                             # a cell against itself
                row = _row(base, test, ctx, same, ra, a_seeds, rb, b_seeds, min_seeds)
                if row["n_seeds"] == 0 and row["_unmeasured"]:
                    unmeasured += 1     # the metric does not apply here (no MI evaluation, no
                    continue            # few-shot classes): not a comparison of this claim
                out.append(row)
    if not out:
        missing = [side_text(s) for s, cells in ((a_side, a_cells), (b_side, b_cells)) if not cells]
        why = (f"no cells of {' and '.join(missing)} in this run" if missing
               else f"the metric ({metric}) is not in the evaluations of the {unmeasured} "
                    "pair(s) of cells that ran" if unmeasured
               else "no context (dataset, arch, eps" + (", " + ", ".join(same) if same else "")
               + (", training block" if same_train else "") + ") where both sides ran")
        out.append({**base, "context": "", "side_a": side_text(a_side), "side_b": side_text(b_side),
                    "n_seeds": 0, "seeds": "[]", "values_a": "[]", "values_b": "[]",
                    "diff_mean": None, "ci_low": None, "ci_high": None, "verdict": "not run",
                    "reason": f"not run: {why} (workflow/config/claims.yaml runs them)",
                    "co_seeds_a": None, "co_seeds_b": None, "_eps": None})
    return out


def _row(base, test, ctx, same, ra, a_seeds, rb, b_seeds, min_seeds) -> Dict[str, Any]:
    seeds, va, vb, diffs = [], [], [], []
    missing = []
    for seed in sorted(set(a_seeds) & set(b_seeds)):
        a = metric_value(a_seeds[seed], test["a"]["metric"])
        b = metric_value(b_seeds[seed], test["b"]["metric"])
        d = None if a is None or b is None else a - b
        if d is None:
            missing.append(seed)
            continue
        seeds.append(seed), va.append(a), vb.append(b), diffs.append(d)
    co = lambda cells: sum(bool(r.get("co_detected")) for s, r in cells.items() if s in seeds)
    row = {**base, "context": _context_text(ctx, same), "side_a": ra, "side_b": rb,
           "n_seeds": len(seeds), "seeds": json.dumps(seeds),
           "values_a": json.dumps([round(v, 4) for v in va]),
           "values_b": json.dumps([round(v, 4) for v in vb]),
           "co_seeds_a": co(a_seeds), "co_seeds_b": co(b_seeds), "_eps": ctx[2]}
    if not diffs:
        return {**row, "diff_mean": None, "ci_low": None, "ci_high": None, "verdict": "inconclusive",
                "reason": f"the metric is not in these cells' evaluations (seeds {missing})",
                "_unmeasured": True}
    mean, low, high = paired_interval(diffs)
    verdict, reason = judge(test["direction"], low, high, len(diffs), min_seeds, test.get("margin"))
    if test["a"]["metric"] == "passes" and vb and all(vb):
        reason += f"; ratio a/b {sum(va) / sum(vb):.3f}"
    if missing:
        reason += f"; seeds {missing} lack the metric"
    return {**row, "diff_mean": mean, "ci_low": low, "ci_high": high, "verdict": verdict,
            "reason": reason, "_unmeasured": False}


# --------------------------------------------------------------------------- claims
def claim_verdict(claim: Mapping[str, Any], rows: List[Mapping[str, Any]]) -> Tuple[str, str]:
    """A claim's verdict from its rows (the claims file's header)."""
    if claim.get("verdict_from") == "largest_eps":
        run = [r for r in rows if r["_eps"] is not None]
        if run:
            top = max(r["_eps"] for r in run)
            rows = [r for r in run if r["_eps"] == top]
    premises = [r for r in rows if r["role"] == "premise"]
    tests = [r for r in rows if r["role"] != "premise"]
    if all(r["verdict"] == "not run" for r in rows):
        return "not run", "no test ran in this run"
    unmet = [r for r in premises if r["verdict"] != "holds"]
    if unmet:
        return "inconclusive", "premise not met: " + "; ".join(
            f"{r['test_id']} {r['verdict']} ({r['context'] or r['reason']})" for r in unmet)
    verdicts = [r["verdict"] for r in tests]
    if "fails" in verdicts:
        return "fails", "failing: " + ", ".join(sorted({r["test_id"] for r in tests if r["verdict"] == "fails"}))
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds", f"all {len(verdicts)} rows hold"
    counts = {v: verdicts.count(v) for v in VERDICTS if verdicts.count(v)}
    return "inconclusive", ", ".join(f"{n} {v}" for v, n in counts.items())


def evaluate_claims(doc: Mapping[str, Any], rows: List[Mapping[str, Any]]
                    ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(test rows, claim summaries) for the rows of a run (one checkpoint: ``last`` when
    present, the checkpoint the paper tables compare)."""
    rows = [r for r in rows if r["checkpoint"] == "last"] or rows
    min_seeds = int(doc.get("min_seeds", 3))
    tests, summaries = [], []
    for claim in doc["claims"]:
        mine = [r for t in claim["tests"] for r in test_rows(claim, t, rows, min_seeds)]
        verdict, why = claim_verdict(claim, mine)
        scale = sorted({f"{r['context']} ({r['n_seeds']} seed{'s' * (r['n_seeds'] != 1)})"
                        for r in mine if r["context"]})
        summaries.append({"claim_id": claim["id"], "seed_paper": claim["seed_paper"],
                          "claim": claim["claim"], "source": claim["source"], "verdict": verdict,
                          "why": why, "scale": "; ".join(scale) or "not run"})
        tests += mine
    return tests, summaries


# --------------------------------------------------------------------------- outputs
def _num(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _values(values_json: str) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in json.loads(values_json)) + "]"


def render_markdown(tests: List[Dict[str, Any]], summaries: List[Dict[str, Any]]) -> str:
    lines = ["Headline claims of the seed papers tested as paired comparisons "
             "(paper_tables/published/claims.yaml; methods/claims.py).  Per seed d = a - b in "
             "points (passes: sample-passes per example); the interval is the 95% t-interval of "
             "the mean over the seeds paired by seed.  holds / fails: the interval clears the "
             "claim's threshold in / against its direction; inconclusive otherwise or with "
             "fewer seeds than the file's min_seeds; not run: this run has no cells for a side.",
             "", "| claim | seed paper | verdict | why | tested at |", "|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {md_cell(s['claim_id'])}: {md_cell(s['claim'])} | {s['seed_paper']} | "
                     f"**{s['verdict']}** | {md_cell(s['why'])} | {md_cell(s['scale'])} |")
    lines += ["", "| claim | test | role | context | a | b | metric | seeds | a per seed | "
              "b per seed | d mean [95% CI] | direction | verdict | reason | CO seeds a/b |",
              "|" + "---|" * 15]
    for r in tests:
        ci = (f"{_num(r['diff_mean'], 2)} [{_num(r['ci_low'], 2)}, {_num(r['ci_high'], 2)}]"
              if r["ci_low"] is not None else _num(r["diff_mean"], 2))
        direction = r["direction"] + (f" {r['margin']:g}" if r.get("margin") is not None else "")
        co = "" if r["co_seeds_a"] is None else f"{r['co_seeds_a']}/{r['co_seeds_b']}"
        lines.append("| " + " | ".join(md_cell(x) for x in (
            r["claim_id"], r["test_id"], r["role"], r["context"] or "-", r["side_a"], r["side_b"],
            r["metric"], r["n_seeds"], _values(r["values_a"]), _values(r["values_b"]), ci, direction,
            f"**{r['verdict']}**", r["reason"], co)) + " |")
    return "\n".join(lines) + "\n"


def render_latex(tests: List[Dict[str, Any]], summaries: List[Dict[str, Any]]) -> str:
    lines = [r"% Generated by methods/claims.py from result files; do not edit.",
             r"\begin{tabular}{llll}", r"\toprule", r"claim & seed paper & verdict & tested at \\",
             r"\midrule"]
    lines += [" & ".join(tex_escape(s[k]) for k in ("claim_id", "seed_paper", "verdict", "scale"))
              + r" \\" for s in summaries]
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\begin{tabular}{lllrrrl}", r"\toprule",
              r"claim & test & context & seeds & $\bar d$ & 95\% CI & verdict \\", r"\midrule"]
    for r in tests:
        ci = (f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["ci_low"] is not None else "--")
        mean = f"{r['diff_mean']:.2f}" if r["diff_mean"] is not None else "--"
        lines.append(f"{tex_escape(r['claim_id'])} & {tex_escape(r['test_id'])} & "
                     f"{tex_escape(r['context'] or '--')} & {r['n_seeds']} & {mean} & {ci} & "
                     f"{tex_escape(r['verdict'])} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_claims(eval_paths: List[Path], definitions: Path, markdown: Path, csv: Path,
                 tex: Path) -> List[Dict[str, Any]]:
    """Write the claims table (Markdown, CSV, LaTeX) of the run's evaluation files; return the
    test rows."""
    doc = load_claims(definitions)
    tests, summaries = evaluate_claims(doc, rows_from_results(eval_paths))
    frame = pd.DataFrame([{k: r.get(k) for k in CSV_COLUMNS} for r in tests], columns=CSV_COLUMNS)
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(markdown, render_markdown(tests, summaries))
    atomic_write_text(tex, render_latex(tests, summaries))
    return tests
