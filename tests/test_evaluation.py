"""Evaluation: CIs, per-class counts, stratified subsets, guards, per-attack threats (eps
sweeps, targeted PGD), attack-spec errors, and PGD vs AutoAttack on the same examples."""
import pytest
import torch

from methods.attack_specs import AttackSpecError
from methods.config import config_hash, resolve_cell, resolve_evaluation
from methods.eval_core import accuracy_ci, accuracy_record, check_adversarial
from methods.evaluation import evaluate_cell
from methods.results import read_result
from methods.subsets import stratified_subset
from methods.threat import ThreatModel
from methods.training import train_cell


def test_exact_binomial_interval():
    ci = accuracy_ci(50, 100)
    assert ci["acc"] == 0.5
    assert ci["ci95"] == pytest.approx([0.3983, 0.6017], abs=1e-4)  # Clopper-Pearson
    assert accuracy_ci(0, 20)["ci95"][0] == 0.0 and accuracy_ci(20, 20)["ci95"][1] == 1.0


def test_per_class_counts_are_indexed_by_class_and_sum_to_the_totals():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    ok = torch.tensor([True, False, True, False, True, True])
    rec = accuracy_record(ok, y, num_classes=4)
    assert rec["per_class"] == {"correct": [1, 1, 2, 0], "total": [2, 1, 3, 0]}
    assert (rec["correct"], rec["n"]) == (4, 6)


def test_stratified_subset_is_seeded_and_proportional():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_subset(y, 100, seed=1)
    assert torch.bincount(y[idx]).tolist() == [60, 30, 10]
    assert torch.equal(idx, stratified_subset(y, 100, seed=1))
    assert not torch.equal(idx, stratified_subset(y, 100, seed=2))
    assert len(set(idx.tolist())) == 100


def test_guards_reject_out_of_ball_and_out_of_range():
    t = ThreatModel("linf", 0.1)
    x = torch.full((2, 1, 2, 2), 0.5)
    check_adversarial(x, x + 0.1, t, "ok")
    with pytest.raises(AssertionError, match="exceeds eps"):
        check_adversarial(x, x + 0.11, t, "too far")
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        check_adversarial(x, x + 0.6, ThreatModel("linf", 1.0), "out of range")


# ----------------------------------------------------------------------------- a trained cell
TINY_CONFIG = {
    "datasets": {"mnist5k": {"source": "mnist5k"}},
    "archs": {"smallcnn-tiny": {"model": "smallcnn", "width": 0.125}},
    "recipes": {"pgd_tiny": {
        "method": "pgd_at", "method_args": {"steps": 3, "alpha": 0.1},
        "threat": {"norm": "linf", "eps": 0.3}, "normalization": "none", "augmentation": "none",
        "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 20,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "cyclic", "peak_at": 0.5},
                  "monitor": {"n": 40, "steps": 2}}}},
    "cells": [{"datasets": ["mnist5k"], "archs": ["smallcnn-tiny"], "recipes": ["pgd_tiny"],
               "seeds": [3]}],
    "evaluation": {
        "checkpoints": ["last", "best"], "batch_size": 200, "n": 100, "seed": 0,
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 5, "alpha": 0.1, "restarts": 2}],
        "autoattack": {"version": "custom", "attacks": ["apgd-ce"], "n": 30, "seed": 0,
                       "compare_pgd": {"name": "pgd", "steps": 20, "alpha": "1/20", "restarts": 2}}},
}


def evaluation_identity(**changes):
    """An evaluation identity by hand: TINY_CONFIG's block with ``changes``, hashed."""
    spec = {k: v for k, v in TINY_CONFIG["evaluation"].items() if k != "checkpoints"}
    spec.update(changes)
    spec = {k: v for k, v in spec.items() if v is not None}
    return {**spec, "eval_hash": config_hash(spec)}


@pytest.fixture(scope="module")
def trained(mnist5k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cell = resolve_cell(TINY_CONFIG, "mnist5k", "smallcnn-tiny", "pgd_tiny", 3)
    train_cell(cell, mnist5k_prepared / "data", mnist5k_prepared / "prepared", out,
               out / "train.json", device="cpu", threads=1, meter_backend="null")
    return mnist5k_prepared, out


def evaluate(trained, evaluation, name="eval.json", checkpoint="last"):
    root, out = trained
    return evaluate_cell(out / "train.json", evaluation, checkpoint, root / "data",
                         root / "prepared", out / name, device="cpu", threads=1,
                         meter_backend="null")


def assert_per_class_consistent(m, num_classes):
    pc = m["per_class"]
    assert len(pc["correct"]) == len(pc["total"]) == num_classes
    assert sum(pc["correct"]) == m["correct"] and sum(pc["total"]) == m["n"]
    assert all(0 <= c <= t for c, t in zip(pc["correct"], pc["total"]))


# ----------------------------------------------------------------------------- evaluate_cell
@pytest.mark.parametrize("checkpoint", ["last", "best"])
def test_evaluation_record_is_guarded_and_complete(trained, checkpoint):
    root, out = trained
    evaluation = resolve_evaluation(TINY_CONFIG, "pgd_tiny")
    rec = evaluate(trained, evaluation, f"eval_{checkpoint}.json", checkpoint)
    assert read_result(out / f"eval_{checkpoint}.json", "eval_result.schema.json") == rec
    assert rec["evaluation"] == evaluation and "evaluation" not in rec["cell"]
    assert rec["provenance"]["eval_hash"] == evaluation["eval_hash"]
    assert rec["checkpoint"]["name"] == checkpoint
    assert rec["guards"]["buffers_unchanged"] and rec["guards"]["eval_mode"]
    assert set(rec["metrics"]) == {"clean", "FGSM", "PGD-5-2-alpha=0.1"}
    pgd = rec["metrics"]["PGD-5-2-alpha=0.1"]
    assert pgd["max_distance"] <= 0.3 + 1e-6 and pgd["threat"] == {"norm": "linf", "eps": 0.3}
    assert pgd["attack"]["early_stop"] is True and pgd["attack"]["alpha"] == 0.1
    assert pgd["acc"] <= rec["metrics"]["clean"]["acc"]
    aa = rec["autoattack"]
    assert len(aa["indices"]) == 30 and aa["indices"] == sorted(aa["indices"])
    # The same examples under PGD: a correct AutoAttack is at least as strong as PGD.
    assert aa["acc"] <= aa["pgd_same_subset"]["acc"] + 1e-12
    assert aa["pgd_same_subset"]["label"].startswith("PGD-20-2-alpha=")
    assert aa["package"] == "pyautoattack"
    assert rec["num_classes"] == 10
    for m in [*rec["metrics"].values(), aa, aa["pgd_same_subset"]]:
        assert_per_class_consistent(m, 10)
    assert rec["metrics"]["clean"]["per_class"]["total"] == [10] * 10   # stratified n=100
    assert aa["per_class"]["total"] == [3] * 10


def test_one_evaluation_sweeps_eps_and_runs_targeted_pgd(trained):
    attacks = [{"name": "pgd", "steps": 5, "alpha": 0.05},
               {"name": "pgd", "steps": 5, "alpha": 0.05, "eps": 0.1},
               {"name": "pgd", "steps": 5, "alpha": 0.05, "targeted": "random"},
               {"name": "pgd", "steps": 5, "alpha": 0.05, "eps": 0.2, "targeted": "least_likely"},
               {"name": "fgsm", "norm": "l2", "eps": 1.5}]
    rec = evaluate(trained, evaluation_identity(attacks=attacks, autoattack=None))
    m = rec["metrics"]
    assert list(m) == ["clean", "PGD-5-1-alpha=0.05", "PGD-5-1-alpha=0.05-eps=0.1", "PGD-5-1-alpha=0.05-targeted=random",
                       "PGD-5-1-alpha=0.05-eps=0.2-targeted=least_likely", "FGSM-L2-eps=1.5"]
    expected = {"PGD-5-1-alpha=0.05": ("linf", 0.3), "PGD-5-1-alpha=0.05-eps=0.1": ("linf", 0.1),
                "PGD-5-1-alpha=0.05-targeted=random": ("linf", 0.3),
                "PGD-5-1-alpha=0.05-eps=0.2-targeted=least_likely": ("linf", 0.2),
                "FGSM-L2-eps=1.5": ("l2", 1.5)}
    for label, (norm, eps) in expected.items():
        assert m[label]["threat"] == {"norm": norm, "eps": eps}, label
        assert 0 < m[label]["max_distance"] <= eps + 1e-6, label   # checked against ITS eps
        assert m[label]["acc"] <= m["clean"]["acc"], label
        assert_per_class_consistent(m[label], 10)
    # A smaller ball cannot be a stronger attack here by much; the 0.1 column is its own number.
    assert m["PGD-5-1-alpha=0.05-eps=0.1"]["max_distance"] <= 0.1 + 1e-6 < m["PGD-5-1-alpha=0.05"]["max_distance"]
    assert m["PGD-5-1-alpha=0.05-targeted=random"]["attack"]["targeted"] == "random"


def test_channels_last_evaluation_is_the_same_function(trained):
    """``evaluation.channels_last`` only picks other conv kernels: the model, every attack and
    AutoAttack give the same per-class counts (exact on this net at these sizes), and the option
    is part of the evaluation identity."""
    attacks = [{"name": "fgsm"}, {"name": "pgd", "steps": 5, "alpha": 0.1, "restarts": 2}]
    aa = {"version": "custom", "attacks": ["apgd-ce", "square"], "n": 20, "seed": 0}
    plain = evaluation_identity(attacks=attacks, autoattack=aa)
    fast = evaluation_identity(attacks=attacks, autoattack=aa, channels_last=True)
    assert plain["eval_hash"] != fast["eval_hash"]
    a = evaluate(trained, plain, "plain.json")
    b = evaluate(trained, fast, "channels_last.json")
    for label in ("clean", "FGSM", "PGD-5-2-alpha=0.1"):
        assert b["metrics"][label]["per_class"] == a["metrics"][label]["per_class"], label
    assert b["autoattack"]["per_class"] == a["autoattack"]["per_class"]
    assert b["evaluation"]["channels_last"] is True
    assert (a["guards"]["memory_format"], b["guards"]["memory_format"]) == ("contiguous", "channels_last")


def test_bad_attack_specs_fail_before_anything_is_written(trained):
    root, out = trained
    with pytest.raises(AttackSpecError, match=r"evaluation.attacks\[1\]: unknown key 'stepz'"):
        evaluate(trained, evaluation_identity(attacks=[{"name": "fgsm"},
                                                        {"name": "pgd", "stepz": 5, "alpha": 0.1}]),
                 "bad.json")
    with pytest.raises(AttackSpecError, match=r"evaluation.attacks\[0\].name: unknown attack 'cw'"):
        evaluate(trained, evaluation_identity(attacks=[{"name": "cw"}]), "bad.json")
    with pytest.raises(AttackSpecError, match="same label 'PGD-5-1-alpha=0.1'"):
        evaluate(trained, evaluation_identity(attacks=[{"name": "pgd", "steps": 5, "alpha": 0.1},
                                                        {"name": "pgd", "steps": 5, "alpha": 0.1,
                                                         "restarts": 1}]),
                 "bad.json")
    assert not (out / "bad.json").exists()


def test_compare_pgd_must_use_autoattacks_threat(trained):
    aa = dict(TINY_CONFIG["evaluation"]["autoattack"], n=10,
              compare_pgd={"name": "pgd", "steps": 2, "alpha": 0.1, "eps": 0.1})
    with pytest.raises(ValueError, match="compare_pgd: norm/eps"):
        evaluate(trained, evaluation_identity(attacks=[], autoattack=aa), "bad_aa.json")


def test_evaluation_needs_an_eval_hash(trained):
    with pytest.raises(ValueError, match="eval_hash"):
        evaluate(trained, {"attacks": []})


# ----------------------------------------------------------------------------- defences
def test_defenses_add_their_metrics_and_leave_the_base_metrics_unchanged(trained):
    root, out = trained
    attacks = [{"name": "pgd", "steps": 5, "alpha": 0.1}]
    aa = dict(TINY_CONFIG["evaluation"]["autoattack"], n=10, compare_pgd=None)
    plain = evaluate(trained, evaluation_identity(attacks=attacks, autoattack=aa), "plain.json")
    defended = evaluation_identity(
        attacks=attacks, autoattack=aa,
        defenses=[{"name": "mi_ol", "samples": 4}, {"name": "gaussian", "samples": 3}],
        defense_attacks=[{"name": "pgd", "steps": 3, "alpha": 0.1, "eot_samples": 2},
                         {"name": "fgsm", "modes": ["oblivious"], "labels": True}],
        defense_autoattack={"version": "rand", "draws": 1, "iterations": 2, "eot_iter": 2})
    rec = evaluate(trained, defended, "defended.json")
    assert read_result(out / "defended.json", "eval_result.schema.json") == rec
    for key in ("clean", "PGD-5-1-alpha=0.1"):
        assert rec["metrics"][key] == plain["metrics"][key]       # the base model's, unchanged
    assert rec["guards"]["buffers_unchanged"] and rec["guards"]["eval_mode"]
    mi = "MI-OL(N=4)"
    assert [k for k in rec["metrics"] if k.startswith(mi)] == [
        f"{mi} | clean", f"{mi} | PGD-3-1-alpha=0.1-no_early_stop | oblivious",
        f"{mi} | PGD-3-1-alpha=0.1-no_early_stop | adaptive-EOT-2",
        f"{mi} | FGSM-labels=true | oblivious"]
    for key, m in rec["metrics"].items():
        assert_per_class_consistent(m, 10)
        if m.get("mode") in ("oblivious", "adaptive"):
            assert m["max_distance"] <= 0.3 + 1e-6 and m["threat"] == {"norm": "linf", "eps": 0.3}, key
    record = rec["defenses"][mi]
    assert record["pool"]["split"] == "val" and record["pool"]["evaluated_images_in_pool"] == 0
    assert record["pool"]["per_class"] == [50] * 10 and record["randomized"]
    assert record["autoattack"]["indices"] == plain["autoattack"]["indices"]   # the same subset
    assert record["autoattack"]["version"] == "rand"
    assert rec["defenses"]["GaussianNoise(σ=0.05,N=3)"]["pool"] is None


# ----------------------------------------------------------------------------- groups, calibration
def test_grouped_dataset_records_per_group_counts_and_calibration(tmp_path):
    """On coloured MNIST-5k (groups = label x colour) every accuracy carries per-group counts
    that sum to its totals, the clean pass a calibration histogram, and the LT / group metrics
    read them back from the files."""
    from methods.data import prepare_dataset
    from methods.lt_metrics import summarize_file

    spec = {"source": "cmnist5k", "spurious": {"correlation": 0.9}, "val_size": 100}
    prepare_dataset("cmnist", spec, tmp_path / "data", tmp_path / "prepared")
    config = {**TINY_CONFIG, "datasets": {"cmnist": spec},
              "cells": [{"datasets": ["cmnist"], "archs": ["smallcnn-tiny"],
                         "recipes": ["pgd_tiny"], "seeds": [3]}]}
    config["recipes"] = {"pgd_tiny": {**TINY_CONFIG["recipes"]["pgd_tiny"],
                                      "train": {**TINY_CONFIG["recipes"]["pgd_tiny"]["train"],
                                                "epochs": 1, "max_steps_per_epoch": 3}}}
    out = tmp_path / "cell"
    train_cell(resolve_cell(config, "cmnist", "smallcnn-tiny", "pgd_tiny", 3), tmp_path / "data",
               tmp_path / "prepared", out, out / "train.json", device="cpu", threads=1,
               meter_backend="null")
    evaluation = evaluation_identity(autoattack={**TINY_CONFIG["evaluation"]["autoattack"], "n": 20})
    rec = evaluate_cell(out / "train.json", evaluation, "last", tmp_path / "data",
                        tmp_path / "prepared", out / "eval.json", device="cpu", threads=1,
                        meter_backend="null")
    for m in [*rec["metrics"].values(), rec["autoattack"], rec["autoattack"]["pgd_same_subset"]]:
        assert sum(m["per_group"]["correct"]) == m["correct"]
        assert sum(m["per_group"]["total"]) == m["n"]
    cal = rec["metrics"]["clean"]["calibration"]
    assert sum(cal["count"]) == rec["metrics"]["clean"]["n"]
    assert sum(cal["correct"]) == rec["metrics"]["clean"]["correct"]
    clean = summarize_file(out / "eval.json")["results"]["clean"]
    pg = rec["metrics"]["clean"]["per_group"]
    worst = min(c / t for c, t in zip(pg["correct"], pg["total"]) if t)
    assert clean["worst_group"]["acc"] == pytest.approx(worst)
    assert 0 <= clean["ece"] <= 1
