"""The claims table (methods/claims.py): pairing by seed and context, the paired t-interval, the
verdict rules of paper_tables/published/claims.yaml, premises, "not run", and the files."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from methods.attack_specs import attack_label, normalize_attack_spec
from methods.claims import (CSV_COLUMNS, ClaimsError, evaluate_claims, judge, load_claims,
                            metric_value, paired_interval, write_claims)
from methods.tables import row_from_record

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "paper_tables" / "published" / "claims.yaml"
PGD = normalize_attack_spec({"name": "pgd", "steps": 10, "alpha": 0.01})
FGSM = normalize_attack_spec({"name": "fgsm"})


def _acc(acc, n=1000):
    c = round(acc * n)
    return {"acc": c / n, "ci95": [max(0, c / n - 0.03), min(1, c / n + 0.03)], "correct": c,
            "n": n, "per_class": {"correct": [c // 2, c - c // 2], "total": [n // 2, n - n // 2]}}


def record(method, recipe, seed, clean, pgd=None, fgsm=None, eps=0.1, dataset="mnist5k",
           args=None, aa=None, defenses=None, passes=None, co=False, train=None):
    """An evaluation record (and its train record) as the result files hold them."""
    metrics = {"clean": _acc(clean)}
    for spec, acc in ((FGSM, fgsm), (PGD, pgd)):
        if acc is not None:
            metrics[attack_label(spec)] = {**_acc(acc), "attack": spec,
                                           "threat": {"norm": "linf", "eps": eps}}
    for (label, mode), acc in (defenses or {}).items():
        metrics[f"{label} | x | {mode}"] = {**_acc(acc), "defense": {"label": label, "name": label},
                                            "mode": mode}
    cell = {"dataset": {"name": dataset}, "arch": {"name": "smallcnn-w0.5"}, "method": method,
            "recipe": recipe, "seed": seed, "method_args": args or {}, "train_hash": "t" * 64,
            "train": train or {"epochs": 10, "optimizer": {"name": "adam", "lr": 1e-3}}}
    ev = {"cell": cell, "checkpoint": {"name": "last", "epoch": 9},
          "threat": {"norm": "linf", "eps": eps}, "metrics": metrics, "test_examples": 1000,
          "autoattack": None if aa is None else {**_acc(aa, 100), "n": 100, "version": "standard"},
          "evaluation": {"eval_hash": "e" * 64}}
    tr = {"catastrophic_overfitting": {"detected": co}, "passes": {"per_example": {
        "forward": (passes or 2) / 2, "backward": (passes or 2) / 2}}, "provenance": {"wall_s": 1.0}}
    return row_from_record(ev, tr)


def claims_doc(*tests, verdict_from="all", min_seeds=3):
    return {"min_seeds": min_seeds, "claims": [{"id": "c", "seed_paper": "bb", "claim": "a beats b",
                                                "source": "s", "verdict_from": verdict_from,
                                                "tests": list(tests)}]}


GREATER = {"id": "t", "a": {"method": "bb", "metric": "pgd"},
           "b": {"method": "nfgsm", "method_args": {"attack_mode": "train"}, "metric": "pgd"},
           "direction": "greater"}


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    diffs = [1.5, 3.0, 2.1]
    mean, low, high = paired_interval(diffs)
    sd = pd.Series(diffs).std(ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert mean == pytest.approx(sum(diffs) / 3)
    assert (low, high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert paired_interval([2.0])[1:] == (None, None)


@pytest.mark.parametrize("direction, low, high, margin, verdict", [
    ("greater", 0.1, 3, None, "holds"), ("greater", -3, -0.1, None, "fails"),
    ("greater", -1, 1, None, "inconclusive"), ("less", -3, -1, None, "holds"),
    ("less", 1, 3, None, "fails"), ("equivalent", -1.9, 1.9, 2, "holds"),
    ("equivalent", 2.1, 5, 2, "fails"), ("equivalent", -5, -2.1, 2, "fails"),
    ("equivalent", 1, 3, 2, "inconclusive"), ("at_most", -9, 1.9, 2, "holds"),
    ("at_most", 2.1, 9, 2, "fails"), ("at_most", 1, 3, 2, "inconclusive")])
def test_verdict_rules(direction, low, high, margin, verdict):
    assert judge(direction, low, high, 3, 3, margin)[0] == verdict


def test_fewer_seeds_than_min_seeds_is_inconclusive_whatever_the_values():
    assert judge("greater", 5, 6, 2, 3)[0] == "inconclusive"
    assert "at least 3" in judge("greater", 5, 6, 2, 3)[1]


def test_pairs_by_seed_within_a_context_and_computes_the_difference():
    rows = []
    for seed, (a, b) in enumerate([(0.90, 0.85), (0.91, 0.86), (0.89, 0.85)]):
        rows += [record("bb", "bb_gs", seed, 0.95, pgd=a), record("nfgsm", "nf", seed, 0.95, pgd=b,
                                                                  args={"attack_mode": "train"})]
    rows.append(record("bb", "bb_gs", 3, 0.95, pgd=0.1))          # no partner seed: left out
    rows.append(record("nfgsm", "nf", 0, 0.95, pgd=0.1, eps=0.2,   # another eps: another context
                       args={"attack_mode": "train"}))
    tests, summary = evaluate_claims(claims_doc(GREATER), rows)
    assert len(tests) == 1
    t = tests[0]
    assert t["context"] == "mnist5k / smallcnn-w0.5 / eps 0.1"
    assert json.loads(t["seeds"]) == [0, 1, 2]
    assert json.loads(t["values_a"]) == [90.0, 91.0, 89.0]
    diffs = [5.0, 5.0, 4.0]
    mean, low, high = paired_interval(diffs)
    assert t["diff_mean"] == pytest.approx(mean) and t["ci_low"] == pytest.approx(low)
    assert t["verdict"] == "holds" and summary[0]["verdict"] == "holds"


def test_method_args_select_the_side():
    rows = [record("bb", "bb_gs", s, 0.95, pgd=0.9) for s in range(3)]
    rows += [record("nfgsm", "nf_eval", s, 0.95, pgd=0.5, args={"attack_mode": "eval"}) for s in range(3)]
    tests, summary = evaluate_claims(claims_doc(GREATER), rows)   # b wants attack_mode train
    assert [t["verdict"] for t in tests] == ["not run"]
    assert "nfgsm (attack_mode=train)" in tests[0]["reason"]
    assert summary[0]["verdict"] == "not run"


def test_a_missing_method_is_reported_not_run_never_absent(tmp_path):
    doc = load_claims(CLAIMS)
    tests, summaries = evaluate_claims(doc, [])
    assert {s["claim_id"] for s in summaries} == {c["id"] for c in doc["claims"]}
    assert all(s["verdict"] == "not run" for s in summaries)
    assert len(tests) == sum(len(c["tests"]) for c in doc["claims"])


def test_same_args_pair_only_equal_values():
    test = {"id": "t", "a": {"method": "selective", "method_args": {"selection": "margin"}, "metric": "pgd"},
            "b": {"method": "selective", "method_args": {"selection": "random"}, "metric": "pgd"},
            "same": ["rho"], "direction": "greater"}
    rows = []
    for s in range(3):
        for rho in (0.25, 0.5):
            rows.append(record("selective", f"m{rho}", s, 0.9, pgd=0.8 + rho / 10,
                               args={"selection": "margin", "rho": rho}))
            rows.append(record("selective", f"r{rho}", s, 0.9, pgd=0.7, args={"selection": "random", "rho": rho}))
    tests, _ = evaluate_claims(claims_doc(test), rows)
    assert sorted((t["side_a"], t["side_b"]) for t in tests) == [("m0.25", "r0.25"), ("m0.5", "r0.5")]
    assert all("rho=" in t["context"] for t in tests)


def test_cells_trained_under_another_schedule_never_pair_unless_the_test_allows_it():
    rows = [record("bb", "bb_gs", s, 0.95, pgd=0.9 + s / 100) for s in range(3)]
    rows += [record("bb", "bb_multistep", s, 0.95, pgd=0.2, train={"epochs": 64}) for s in range(3)]
    rows += [record("nfgsm", "nf", s, 0.95, pgd=0.85, args={"attack_mode": "train"}) for s in range(3)]
    tests, _ = evaluate_claims(claims_doc(GREATER), rows)
    assert [(t["side_a"], t["side_b"]) for t in tests] == [("bb_gs", "nf")]
    loose, _ = evaluate_claims(claims_doc({**GREATER, "same_train": False}), rows)
    assert sorted((t["side_a"], t["side_b"]) for t in loose) == [("bb_gs", "nf"), ("bb_multistep", "nf")]


def test_two_metrics_of_one_cell_pair_the_cell_with_itself_only():
    test = {"id": "mi", "a": {"method": "mixup", "metric": {"defense": "MI-OL", "mode": "oblivious"}},
            "b": {"method": "mixup", "metric": "pgd"}, "direction": "greater"}
    rows = [record("mixup", r, s, 0.9, pgd=0.2, defenses={("MI-OL", "oblivious"): 0.4})
            for s in range(3) for r in ("mix_a", "mix_b")]
    tests, _ = evaluate_claims(claims_doc(test), rows)
    assert sorted((t["side_a"], t["side_b"]) for t in tests) == [("mix_a", "mix_a"), ("mix_b", "mix_b")]
    assert tests[0]["diff_mean"] == pytest.approx(20.0)


def test_cells_without_the_metric_are_not_comparisons_of_the_claim():
    test = {"id": "mi", "a": {"method": "mixup", "metric": {"defense": "MI-OL", "mode": "oblivious"}},
            "b": {"method": "mixup", "metric": "pgd"}, "direction": "greater"}
    rows = [record("mixup", "with_mi", s, 0.9, pgd=0.2, defenses={("MI-OL", "oblivious"): 0.4})
            for s in range(3)]
    rows += [record("mixup", "plain", s, 0.9, pgd=0.2) for s in range(3)]
    tests, _ = evaluate_claims(claims_doc(test), rows)
    assert [(t["side_a"], t["verdict"]) for t in tests] == [("with_mi", "holds")]
    none, summary = evaluate_claims(claims_doc(test), rows[3:])
    assert none[0]["verdict"] == "not run" and "MI-OL oblivious" in none[0]["reason"]


def test_an_unmet_premise_makes_the_claim_inconclusive_even_if_the_tests_hold():
    premise = {"id": "gain", "role": "premise", "a": {"method": "mixup", "metric": "fgsm"},
               "b": {"method": "standard", "metric": "fgsm"}, "direction": "greater"}
    at_most = {"id": "pgd", "a": {"method": "mixup", "metric": "pgd"},
               "b": {"method": "standard", "metric": "pgd"}, "direction": "at_most", "margin": 2.0}
    rows = []
    for s, jitter in enumerate((0.0, 0.01, -0.01)):
        rows.append(record("mixup", "mx", s, 0.9, fgsm=0.5 + jitter, pgd=0.2))
        rows.append(record("standard", "st", s, 0.9, fgsm=0.7, pgd=0.6 + jitter))
    tests, summary = evaluate_claims(claims_doc(premise, at_most), rows)
    assert [t["verdict"] for t in tests] == ["fails", "holds"]
    assert summary[0]["verdict"] == "inconclusive"
    assert summary[0]["why"].startswith("premise not met")


def test_verdict_from_the_largest_eps_only():
    test = {"id": "co", "a": {"method": "nfgsm", "metric": "pgd"}, "b": {"method": "fgsm_rs", "metric": "pgd"},
            "direction": "greater"}
    rows = []
    for s, j in enumerate((0.0, 0.01, -0.01)):
        rows += [record("nfgsm", "n1", s, 0.9, pgd=0.8 + j), record("fgsm_rs", "f1", s, 0.9, pgd=0.8),
                 record("nfgsm", "n3", s, 0.9, pgd=0.6 + j, eps=0.3),
                 record("fgsm_rs", "f3", s, 0.9, pgd=0.0, eps=0.3, co=True)]
    tests, summary = evaluate_claims(claims_doc(test, verdict_from="largest_eps"), rows)
    assert [t["verdict"] for t in tests] == ["inconclusive", "holds"]
    assert tests[1]["co_seeds_b"] == 3 and tests[1]["co_seeds_a"] == 0
    assert summary[0]["verdict"] == "holds"
    _, every = evaluate_claims(claims_doc(test), rows)
    assert every[0]["verdict"] == "inconclusive"


def test_metrics_read_the_strongest_own_eps_pgd_autoattack_and_passes():
    row = record("bb", "b", 0, 0.95, pgd=0.8, fgsm=0.85, aa=0.75, passes=17.4)
    weaker = normalize_attack_spec({"name": "pgd", "steps": 5, "alpha": 0.01})
    row["_metrics"][attack_label(weaker)] = {**_acc(0.83), "attack": weaker,
                                             "threat": {"norm": "linf", "eps": 0.1}}
    other_eps = normalize_attack_spec({"name": "pgd", "steps": 10, "alpha": 0.01, "eps": 0.3})
    row["_metrics"][attack_label(other_eps)] = {**_acc(0.01), "attack": other_eps,
                                                "threat": {"norm": "linf", "eps": 0.3}}
    assert metric_value(row, "pgd") == pytest.approx(80.0)
    assert metric_value(row, "fgsm") == pytest.approx(85.0)
    assert metric_value(row, "autoattack") == pytest.approx(75.0)
    assert metric_value(row, "passes") == pytest.approx(17.4)
    assert metric_value(record("bb", "b", 0, 0.9), "autoattack") is None


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["tests"][0].pop("direction"), "'direction'"),
    (lambda c: c["tests"][0].update(direction="bigger"), "direction 'bigger'"),
    (lambda c: c["tests"][0].update(direction="equivalent"), "'margin'"),
    (lambda c: c["tests"][0]["a"].update(metric="pgd40"), "metric 'pgd40'"),
    (lambda c: c.pop("source"), "'source'")])
def test_a_malformed_claim_is_rejected_naming_the_field(tmp_path, mutate, field):
    doc = claims_doc(json.loads(json.dumps(GREATER)))
    mutate(doc["claims"][0])
    path = tmp_path / "claims.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ClaimsError, match=field):
        load_claims(path)


def test_the_published_claims_file_loads_and_covers_every_seed_paper():
    doc = load_claims(CLAIMS)
    assert {c["seed_paper"] for c in doc["claims"]} == {"bb", "selective", "baselines",
                                                        "batchout_notes", "iada"}
    assert doc["min_seeds"] >= 3


def test_write_claims_files(tmp_path, monkeypatch):
    rows = [record("bb", "bb_gs", s, 0.95, pgd=0.9) for s in range(3)]
    monkeypatch.setattr("methods.claims.rows_from_results", lambda paths: rows)
    out = write_claims([], CLAIMS, tmp_path / "c.md", tmp_path / "c.csv", tmp_path / "c.tex")
    frame = pd.read_csv(tmp_path / "c.csv")
    assert list(frame.columns) == CSV_COLUMNS and len(frame) == len(out)
    md = (tmp_path / "c.md").read_text()
    assert "bb_beats_nfgsm" in md and "**not run**" in md
    tex = (tmp_path / "c.tex").read_text()
    assert "bb\\_beats\\_nfgsm" in tex and "\\begin{tabular}" in tex

