"""The gradient-masking report: computed from evaluation records only, it flags the seed's
BatchOut pattern (FGSM 52%, PGD 2-3%, AutoAttack 0.8%), leaves a healthy model alone, finds
accuracy that rises with eps beyond its intervals, and says n/a instead of crashing."""
import subprocess
import sys

import pandas as pd
import pytest
from scipy.stats import binomtest

from methods.attack_specs import attack_label, normalize_attack_spec
from methods.cli import main
from methods.config import REPO_ROOT, config_hash
from methods.masking_report import (FGSM_PGD_SIGN_POINTS, MASKING_GAP_POINTS, assess,
                                    assess_group, masking_report, verdict)
from methods.results import write_result

C10 = 8 / 255
PGD10 = {"name": "pgd", "steps": 10, "alpha": "2/255"}
PGD10_MNIST = {"name": "pgd", "steps": 10, "alpha": 0.01}


# ----------------------------------------------------------------------------- synthetic records
def acc(correct, n):
    """An accuracy record with its exact 95% interval and two classes' counts."""
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"acc": correct / n, "ci95": [float(ci.low), float(ci.high)], "correct": correct,
            "n": n, "per_class": {"correct": [correct // 2, correct - correct // 2],
                                  "total": [n // 2, n - n // 2]}}


def metric(spec, correct, n, base_eps, norm="linf"):
    spec = normalize_attack_spec(spec)
    threat = {"norm": spec["norm"] or norm, "eps": spec["eps"] if spec["eps"] is not None else base_eps}
    return attack_label(spec), {**acc(correct, n), "attack": spec, "threat": threat,
                                "max_distance": threat["eps"]}


def record(recipe, clean, attacks, *, n=1000, eps=C10, source="cifar10", aa=None,
           extra_metrics=None, seed=0):
    """An evaluation record: ``clean`` correct of ``n``; ``attacks``: [(spec, correct)];
    ``aa``: dict(correct=, n=, warnings=[], pgd=correct on the same subset, aa_not_pgd=0)."""
    cell = {"dataset": {"name": source, "source": source},
            "arch": {"name": "vgg19bn", "model": "vgg19bn"}, "recipe": recipe,
            "method": "batchout", "method_args": {}, "threat": {"norm": "linf", "eps": eps},
            "train": {"epochs": 1}, "seed": seed,
            "runtime": {"amp": None, "channels_last": None, "compile": None}}
    cell["train_hash"] = config_hash(cell)
    evaluation = {"attacks": [s for s, _ in attacks]}
    evaluation["eval_hash"] = config_hash(evaluation)
    metrics = {"clean": acc(clean, n), **dict(metric(s, c, n, eps) for s, c in attacks),
               **(extra_metrics or {})}
    block = None
    if aa is not None:
        block = {**acc(aa["correct"], aa["n"]), "indices": list(range(aa["n"])),
                 "package": "pyautoattack", "package_version": "0.2.0", "version": "standard",
                 "warnings": list(aa.get("warnings", [])), "subset_seed": 0}
        if "pgd" in aa:
            spec = normalize_attack_spec({**PGD10, "steps": 50, "restarts": 10})
            block["pgd_same_subset"] = {
                **acc(aa["pgd"], aa["n"]), "attack": spec, "label": attack_label(spec),
                "threat": {"norm": "linf", "eps": eps}, "max_distance": eps,
                "robust_to_pgd_not_aa": aa["pgd"] - aa["correct"] + aa.get("aa_not_pgd", 0),
                "robust_to_aa_not_pgd": aa.get("aa_not_pgd", 0)}
    return {"kind": "evaluate", "cell": cell, "evaluation": evaluation,
            "checkpoint": {"name": "last", "epoch": 0}, "threat": {"norm": "linf", "eps": eps},
            "num_classes": 2, "test_examples": n, "metrics": metrics, "autoattack": block,
            "guards": {"eval_mode": True, "buffers_unchanged": True, "inputs_in_unit_box": True},
            "measurement": {"backend": "null", "records": []},
            "provenance": {"train_hash": cell["train_hash"], "eval_hash": evaluation["eval_hash"],
                           "git": {"commit": None}, "python": "3.11",
                           "packages": {"torch": "2", "pyautoattack": None},
                           "device": {"type": "cpu"}, "seed": 0, "wall_s": 1.0}}


def save(tmp_path, ev):
    path = tmp_path / ev["cell"]["recipe"] / "eval_last.json"
    write_result(path, ev, "eval_result.schema.json")
    return path


# The seed's alt_3 BatchOut FGSM list (eps 0..8/255, %) and its PGD / AutoAttack observation.
ALT_3 = [86.73, 75.48, 69.09, 64.91, 61.92, 59.04, 56.93, 54.58, 52.57]


def fgsm_grid(percent, eps_unit=1 / 255, n=1000, last_is_plain=True):
    """FGSM specs at k * eps_unit (k = 1..) with the given accuracies; the last one as the plain
    ``{name: fgsm}`` at the evaluation's eps when ``last_is_plain``."""
    out = []
    for k, p in enumerate(percent, start=1):
        spec = ({"name": "fgsm"} if last_is_plain and k == len(percent)
                else {"name": "fgsm", "eps": k * eps_unit})
        out.append((spec, round(p * n / 100)))
    return out


def seed_batchout(aa=True, pgd=True):
    attacks = fgsm_grid(ALT_3[1:]) + ([(PGD10, 25)] if pgd else [])       # PGD-10: 2.5%
    return record("batchout_alt_3", 867, attacks,
                  aa={"correct": 8, "n": 1000, "pgd": 25} if aa else None)   # AutoAttack 0.8%


def healthy():
    grid = [72, 66, 63, 60, 58.5, 57.5, 56.5, 56]
    return record("pgd_at", 800, fgsm_grid(grid) + [(PGD10, 500)],
                  aa={"correct": 470, "n": 1000, "pgd": 480})


# ----------------------------------------------------------------------------- verdicts
def test_the_seeds_batchout_pattern_is_flagged_as_masking():
    row = assess_group(seed_batchout())
    assert row["verdict"] == "masking"
    assert row["fgsm_acc"] == pytest.approx(0.526) and row["autoattack_acc"] == pytest.approx(0.008)
    assert row["fgsm_minus_aa"] == pytest.approx(52.6 - 0.8) and row["fgsm_minus_aa_apart"]
    assert row["fgsm_minus_pgd"] == pytest.approx(52.6 - 2.5) and row["fgsm_minus_pgd_eps"] == C10
    assert row["pgd_label"] == "PGD-10-1-alpha=2/255"
    assert row["pgd_minus_aa_same_subset"] == pytest.approx(1.7)
    assert row["non_monotone"] == [] and row["autoattack_warnings"] == []
    assert any(r.startswith("FGSM - AutoAttack = 51.8") for r in row["masking_reasons"])
    # Either comparison alone is enough: without AutoAttack (FGSM - PGD), without PGD (FGSM - AA).
    assert assess_group(seed_batchout(aa=False))["verdict"] == "masking"
    no_pgd = assess_group(seed_batchout(pgd=False))
    assert no_pgd["verdict"] == "masking" and no_pgd["fgsm_minus_pgd"] is None
    assert verdict(seed_batchout()) == "masking"


def test_a_healthy_model_is_not_flagged():
    row = assess_group(healthy())
    assert row["verdict"] == "no sign", row["signs"]
    assert row["fgsm_minus_aa"] == pytest.approx(56 - 47)
    assert row["fgsm_minus_pgd"] == pytest.approx(6.0)
    assert row["signs"] == [] and row["masking_reasons"] == []


def test_a_gap_counts_only_when_the_intervals_do_not_overlap():
    # FGSM 40% of 50 vs AutoAttack 1 of 10: 30 points apart, but the intervals overlap.
    ev = record("small", 40, [({"name": "fgsm"}, 20)], n=50,
                aa={"correct": 1, "n": 10})
    row = assess_group(ev)
    assert row["fgsm_minus_aa"] == pytest.approx(30.0) and 30.0 > MASKING_GAP_POINTS
    assert not row["fgsm_minus_aa_apart"] and row["verdict"] == "no sign"
    # The same gap on 1,000 and 100 examples is apart: masking.
    ev = record("large", 800, [({"name": "fgsm"}, 400)], aa={"correct": 10, "n": 100})
    assert assess_group(ev)["verdict"] == "masking"
    # FGSM - PGD between the sign and the masking thresholds: suspect.
    gap = (FGSM_PGD_SIGN_POINTS + MASKING_GAP_POINTS) / 2
    ev = record("mid", 800, [({"name": "fgsm"}, 500), (PGD10, round(10 * (50 - gap)))])
    row = assess_group(ev)
    assert row["fgsm_minus_pgd"] == pytest.approx(gap) and row["verdict"] == "suspect"


def test_accuracy_rising_with_eps_beyond_its_intervals_is_a_sign():
    mnist = dict(eps=0.1, source="mnist5k")
    rising = record("rising", 950, [({"name": "fgsm", "eps": 0.05}, 400), ({"name": "fgsm"}, 300),
                                    ({"name": "fgsm", "eps": 0.15}, 600), (PGD10_MNIST, 280)],
                    **mnist)
    row = assess_group(rising)
    assert row["verdict"] == "suspect"
    assert row["non_monotone"] == ["FGSM Linf: 60.0% at eps 0.15 above 30.0% at eps 0.1"]
    # A rise inside the intervals (30.0% -> 31.0% of 1,000) is not.
    flat = record("flat", 950, [({"name": "fgsm", "eps": 0.05}, 400), ({"name": "fgsm"}, 300),
                                ({"name": "fgsm", "eps": 0.15}, 310), (PGD10_MNIST, 280)], **mnist)
    row = assess_group(flat)
    assert row["non_monotone"] == [] and row["verdict"] == "no sign"


def test_autoattack_warnings_and_subset_disagreements_are_signs():
    base = dict(aa={"correct": 470, "n": 1000, "pgd": 480})
    ev = healthy()
    ev["autoattack"]["warnings"] = ["it seems that the output is a randomized function"]
    row = assess_group(ev)
    assert row["verdict"] == "suspect" and row["signs"] == ["AutoAttack warnings (1)"]
    ev = record("gap", 800, [({"name": "fgsm"}, 560)], aa={"correct": 400, "n": 1000, "pgd": 480})
    assert assess_group(ev)["pgd_minus_aa_same_subset"] == pytest.approx(8.0)
    assert assess_group(ev)["verdict"] == "suspect"
    ev = record("aa_missed", 800, [({"name": "fgsm"}, 560)],
                aa={**base["aa"], "aa_not_pgd": 3})
    assert "3 examples robust to AutoAttack but not to PGD" in assess_group(ev)["signs"]


def test_robust_above_clean_and_weak_multi_targeted_pgd_are_signs():
    above = record("above", 500, [({"name": "fgsm"}, 600), (PGD10, 450)])
    assert assess_group(above)["robust_above_clean"] == ["FGSM: 60.0% vs clean 50.0%"]
    weak = record("weak", 800, [(PGD10, 400), ({**PGD10, "targeted": "all"}, 600)])
    row = assess_group(weak)
    assert row["targeted_weaker"] == ["PGD-10-1-alpha=2/255-targeted=all: 60.0% above untargeted 40.0%"]
    assert row["verdict"] == "suspect"
    # A random target is expected to be weaker: no sign.
    rand = record("rand", 800, [(PGD10, 400), ({**PGD10, "targeted": "random"}, 600)])
    assert assess_group(rand)["verdict"] == "n/a"


def test_missing_fgsm_pgd_or_autoattack_is_na_not_an_error(tmp_path):
    only_clean = record("clean_only", 900, [])
    only_pgd = record("pgd_only", 900, [(PGD10, 400)])
    for ev in (only_clean, only_pgd):
        row = assess_group(ev)
        assert row["verdict"] == "n/a"
        assert row["fgsm_acc"] is None and row["fgsm_minus_aa"] is None
    paths = [save(tmp_path, ev) for ev in (only_clean, only_pgd)]
    rows = masking_report(paths, tmp_path / "m.md", tmp_path / "m.csv")
    md = (tmp_path / "m.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| clean_only"))
    assert line.count("n/a") >= 6
    assert [r["verdict"] for r in rows] == ["n/a", "n/a"]
    masking_report([], tmp_path / "e.md", tmp_path / "e.csv")
    assert "(no evaluation files)" in (tmp_path / "e.md").read_text()


def test_defended_metrics_are_their_own_rows():
    """An evaluation-time defence's metrics ("MI-OL | <attack> | <mode>", "MI-OL | clean")
    are judged against the defence's own clean accuracy, never mixed into the base model."""
    defense = {"label": "MI-OL", "spec": {"name": "mi_ol"}, "randomized": True}
    extra = {"MI-OL | clean": {**acc(840, 1000), "defense": defense}}
    for spec, correct in (({"name": "fgsm"}, 600), (PGD10, 50)):
        label, m = metric(spec, correct, 1000, C10)
        extra[f"MI-OL | {label} | oblivious"] = {**m, "defense": defense}
    ev = record("mixup", 900, [({"name": "fgsm"}, 300), (PGD10, 250)], extra_metrics=extra)
    rows = assess(ev)
    assert [(r["defense"], r["mode"]) for r in rows] == [("", ""), ("MI-OL", "oblivious")]
    base, mi = rows
    assert base["verdict"] == "no sign" and base["fgsm_acc"] == 0.3 and base["clean_acc"] == 0.9
    assert mi["clean_acc"] == 0.84 and mi["fgsm_acc"] == 0.6 and mi["pgd_acc"] == 0.05
    assert mi["verdict"] == "masking" and mi["autoattack_acc"] is None


def test_report_files_and_cli(tmp_path):
    paths = [save(tmp_path, seed_batchout()), save(tmp_path, healthy())]
    assert main(["masking-report", "--evals", *map(str, paths), "--markdown",
                 str(tmp_path / "r.md"), "--csv", str(tmp_path / "r.csv")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert f"above {MASKING_GAP_POINTS:g} points with non-overlapping 95% intervals" in md
    flagged = next(l for l in md.splitlines() if l.startswith("| batchout_alt_3"))
    assert flagged.endswith("| **masking** |") and "+51.8" in flagged
    assert next(l for l in md.splitlines() if l.startswith("| pgd_at")).endswith("| no sign |")
    csv = pd.read_csv(tmp_path / "r.csv").set_index("recipe")
    assert csv.loc["batchout_alt_3", "verdict"] == "masking"
    assert csv.loc["pgd_at", "fgsm_minus_aa"] == pytest.approx(9.0)
    assert csv.loc["batchout_alt_3", "autoattack_ci_high"] < csv.loc["batchout_alt_3", "fgsm_ci_low"]


def test_snakemake_plans_the_report_and_the_plot_without_ambiguity(tmp_path):
    """A dry run of the smoke config asking for the report and the plot by path: each is made
    by its own rule from every evaluation file, and the main table still by aggregate."""
    targets = [tmp_path / "r" / p for p in ("tables/masking/smoke.md", "plots/eps_curves/smoke.png",
                                            "tables/smoke.md")]
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", *map(str, targets),
         "--configfile", "workflow/config/smoke.yaml", "--config", f"results_dir={tmp_path / 'r'}",
         f"data_dir={tmp_path / 'd'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for rule in ("masking_report", "eps_curves", "aggregate"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, out[-3000:]
