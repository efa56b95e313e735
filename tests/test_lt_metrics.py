"""Long-tail / subpopulation metrics from evaluation files (methods.lt_metrics, torch-free) and the
counts evaluation writes for them (methods.eval_extras), against hand computations."""
from __future__ import annotations

import ast
import json
import math

import pytest
import torch

from methods import eval_extras as X
from methods import lt_metrics as M
from methods.config import REPO_ROOT

LT100 = [390, 233, 140, 84, 50, 30, 18, 10, 6, 3]      # MNIST-5k-LT, imbalance 100 (test_data pins it)


# --------------------------------------------------------------------------------------- shot buckets
def test_shot_buckets_scaled_with_the_head_class_for_mnist5k():
    s = M.shot_thresholds(LT100)
    assert s["factor"] == pytest.approx(390 / 500)
    assert s["many_threshold"] == pytest.approx(78.0) and s["few_threshold"] == pytest.approx(15.6)
    assert s["classes"] == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert s["train_class_counts"] == LT100 and "n_max / 500" in s["rule"]


def test_shot_buckets_unscaled_and_literature_boundaries():
    s = M.shot_thresholds(LT100, scale="none")
    assert (s["many_threshold"], s["few_threshold"]) == (100, 20)
    assert s["classes"] == {"many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    # CIFAR-100-LT's head class of 500: the scaled rule is the literature's; 100 and 20 are medium
    s = M.shot_thresholds([500, 101, 100, 20, 19])
    assert s["factor"] == 1.0 and s["classes"] == {"many": [0, 1], "medium": [2, 3], "few": [4]}
    with pytest.raises(ValueError, match="'sqrt'"):
        M.shot_thresholds(LT100, scale="sqrt")


# --------------------------------------------------------------------------------- one accuracy record
def record(correct, total, **extra):
    return {"acc": sum(correct) / sum(total), "ci95": [0, 1], "correct": sum(correct), "n": sum(total),
            "per_class": {"correct": correct, "total": total}, **extra}


def test_breakdown_equals_hand_computation():
    correct = [100, 98, 95, 90, 80, 70, 60, 40, 30, 10]
    total = [100] * 10
    out = M.breakdown(record(correct, total), M.shot_thresholds(LT100))
    assert out["top1"] == pytest.approx(673 / 1000) and out["n"] == 1000
    assert out["many"]["acc"] == pytest.approx((1.0 + 0.98 + 0.95 + 0.90) / 4)
    assert out["medium"]["acc"] == pytest.approx((0.80 + 0.70 + 0.60) / 3)
    assert out["few"]["acc"] == pytest.approx((0.40 + 0.30 + 0.10) / 3)
    assert out["few"]["classes"] == [7, 8, 9] and out["few"]["n"] == 300
    assert out["worst_class"] == {"class": 9, "acc": 0.10, "n": 100}
    assert out["mean_class_acc"] == pytest.approx(0.673)
    assert "worst_group" not in out and "ece" not in out


def test_shot_accuracy_is_the_mean_of_class_accuracies_and_skips_absent_classes():
    # an unbalanced subset (AutoAttack's): class 1 has no example, pooled != mean of classes
    correct, total = [1, 0, 9, 5, 0, 0, 0, 0, 0, 0], [2, 0, 10, 10, 1, 1, 1, 1, 1, 1]
    out = M.breakdown(record(correct, total), M.shot_thresholds(LT100))
    assert out["per_class_acc"][1] is None
    assert out["many"]["acc"] == pytest.approx((0.5 + 0.9 + 0.5) / 3)      # classes 0, 2, 3
    assert out["top1"] == pytest.approx(15 / 28)


def test_worst_group_from_per_group_counts():
    per_group = {"correct": [90, 3, 0, 45], "total": [100, 10, 0, 50]}
    names = ["landbird,land", "landbird,water", "waterbird,land", "waterbird,water"]
    out = M.worst_group(per_group, names)
    assert out["worst_group"] == {"acc": 0.3, "group": 1, "name": "landbird,water", "correct": 3, "n": 10}
    assert out["mean_group_acc"] == pytest.approx((0.9 + 0.3 + 0.9) / 3)
    assert out["groups_evaluated"] == 3 and out["groups_without_examples"] == [2]


def test_ece_on_a_known_histogram():
    hist = {"bins": 4, "count": [0, 10, 20, 30], "correct": [0, 5, 18, 30], "confidence_sum": [0.0, 6.0, 17.0, 27.0]}
    out = M.expected_calibration_error(hist)
    assert out["ece"] == pytest.approx((1 + 1 + 3) / 60)
    assert out["mce"] == pytest.approx(max(1 / 10, 1 / 20, 3 / 30))
    assert M.expected_calibration_error({"count": [0], "correct": [0], "confidence_sum": [0.0]})["ece"] is None


# ------------------------------------------------------------------------------ counts from eval_extras
def direct_ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Guo et al.'s _ECELoss, written out per bin with float32 edges."""
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            frac = inside.double().mean()
            ece += float(frac * abs((pred[inside] == y[inside]).double().mean() - conf[inside].double().mean()))
    return ece


def test_calibration_histogram_gives_guo_et_al_ece():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 3
    probs, y = logits.softmax(1), torch.randint(0, 10, (500,), generator=g)
    hist = X.calibration_histogram(probs, y)
    assert hist["bins"] == 15 and sum(hist["count"]) == 500
    assert sum(hist["correct"]) == int((probs.argmax(1) == y).sum())
    assert M.expected_calibration_error(hist)["ece"] == pytest.approx(direct_ece(probs, y), abs=1e-9)
    assert json.loads(json.dumps(hist)) == hist                   # plain JSON


def test_calibration_bins_are_lower_open_upper_closed():
    edges = torch.linspace(0, 1, 16)                 # Guo et al.'s float32 edges
    conf = torch.stack([edges[1], torch.nextafter(edges[1], torch.tensor(1.0)), edges[8], edges[14],
                        torch.tensor(1.0)])
    probs = torch.cat([conf[:, None], ((1 - conf) / 19)[:, None].expand(5, 19)], 1)     # 20 classes, max = conf
    assert torch.equal(probs.max(1).values, conf)
    hist = X.calibration_histogram(probs, torch.tensor([0, 1, 0, 0, 0]), bins=15)
    want = [0] * 15
    for b in (0, 1, 7, 13, 14):                      # an edge belongs to the bin below it
        want[b] += 1
    assert hist["count"] == want
    assert hist["correct"] == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    assert hist["confidence_sum"][7] == pytest.approx(float(edges[8])) and hist["confidence_sum"][14] == 1.0
    one = X.calibration_histogram(torch.tensor([[0.2, 0.8]]), torch.tensor([1]), bins=1)
    assert one["count"] == [1] and one["correct"] == [1] and one["confidence_sum"] == [pytest.approx(0.8)]


def test_calibration_uses_the_given_predictions():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    y = torch.tensor([1, 1])
    assert sum(X.calibration_histogram(probs, y)["correct"]) == 1                       # argmax picks class 0
    assert sum(X.calibration_histogram(probs, y, pred=torch.tensor([1, 1]))["correct"]) == 2


def test_group_counts_equal_a_direct_count_and_refuse_bad_ids():
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 6, (300,), generator=g)
    ok = torch.rand(300, generator=g) < 0.7
    out = X.group_counts(ok, groups, 8)
    assert out["total"] == [int((groups == k).sum()) for k in range(8)]
    assert out["correct"] == [int((ok & (groups == k)).sum()) for k in range(8)]
    assert out["total"][6:] == [0, 0] and sum(out["correct"]) == int(ok.sum())
    with pytest.raises(ValueError, match="0..3"):
        X.group_counts(ok, groups, 4)
    assert X.evaluated_groups(None, torch.arange(3)) is None
    assert X.evaluated_groups(groups, torch.tensor([2, 0])).tolist() == [int(groups[2]), int(groups[0])]


def test_clean_predictions_match_the_evaluation_argmax():
    from methods.eval_core import predict
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.rand(23, 3, 2, 2)
    pred, probs = X.clean_predictions(model, x, batch_size=7)
    assert torch.equal(pred, predict(model, x, 7)) and probs.shape == (23, 5)
    assert torch.allclose(probs.sum(1), torch.ones(23))


# ------------------------------------------------------------------------------------ whole files
def eval_and_train(tmp_path):
    per_group = {"correct": [40, 2, 5, 45], "total": [50, 10, 10, 50]}
    clean = record([50, 45, 40, 30, 20, 10, 5, 3, 2, 1], [50] * 10, per_group=per_group,
                   calibration={"bins": 2, "count": [100, 400], "correct": [40, 166], "confidence_sum": [45.0, 360.0]})
    pgd = {**record([30, 20, 10, 5, 2, 1, 0, 0, 0, 0], [50] * 10, per_group={"correct": [20, 0, 1, 30], "total": [50, 10, 10, 50]}),
           "attack": {"name": "pgd"}, "threat": {"norm": "linf", "eps": 0.1}, "max_distance": 0.1}
    aa = {**record([5, 3, 2, 1, 0, 0, 0, 0, 0, 0], [10] * 10), "indices": list(range(100)),
          "pgd_same_subset": {**record([5, 3, 2, 2, 0, 0, 0, 0, 0, 0], [10] * 10), "label": "PGD-50-10"}}
    ev = {"cell": {"dataset": {"name": "cm"}}, "checkpoint": {"name": "last"},
          "metrics": {"clean": clean, "PGD-40-1": pgd}, "autoattack": aa}
    tr = {"data": {"splits": {"train": {"class_counts": LT100}},
                   "groups": {"num_groups": 4, "names": ["a", "b", "c", "d"], "definition": "2y+a"}}}
    (tmp_path / "eval_last.json").write_text(json.dumps(ev))
    (tmp_path / "train.json").write_text(json.dumps(tr))
    return tmp_path / "eval_last.json"


def test_summary_of_an_eval_file_and_its_train_json(tmp_path):
    s = M.summarize_file(eval_and_train(tmp_path))
    assert set(s["results"]) == {"clean", "PGD-40-1", "AutoAttack", "AutoAttack subset: PGD-50-10"}
    assert s["shots"]["many_threshold"] == pytest.approx(78.0) and s["groups"]["names"] == ["a", "b", "c", "d"]
    clean = s["results"]["clean"]
    assert clean["worst_group"]["group"] == 1 and clean["worst_group"]["acc"] == pytest.approx(0.2)
    assert clean["ece"] == pytest.approx((5 + 194) / 500)
    assert clean["few"]["acc"] == pytest.approx((3 + 2 + 1) / 150)
    assert s["results"]["PGD-40-1"]["worst_group"]["acc"] == 0.0
    h = M.headline(s)
    assert h["clean"] == pytest.approx(206 / 500) and h["ECE"] == pytest.approx(199 / 500)
    assert h["PGD-40-1 worst-group"] == 0.0 and h["AutoAttack many"] == pytest.approx((0.5 + 0.3 + 0.2 + 0.1) / 4)
    assert "AutoAttack worst-group" not in h                     # no per-group counts there


def test_cli_prints_the_summary(tmp_path, capsys):
    M.main([str(eval_and_train(tmp_path)), "--scale", "none"])
    out = json.loads(capsys.readouterr().out)
    assert out["shots"]["scale"] == "none" and out["shots"]["few_threshold"] == 20


def test_missing_train_counts_are_named(tmp_path):
    path = eval_and_train(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"data": {}}))
    with pytest.raises(ValueError, match="data.splits.train.class_counts"):
        M.summarize_file(path)
    (tmp_path / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match="train.json"):
        M.summarize_file(path)


def test_lt_metrics_imports_no_torch():
    tree = ast.parse((REPO_ROOT / "methods" / "lt_metrics.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m == "torch" or m.startswith("torch.") or m.startswith("methods") for m in mods), mods
    assert math.isclose(M.REFERENCE_N_MAX, 500)
