"""Evaluation: CIs, stratified subsets, guards, and PGD vs AutoAttack on the same examples."""
import pytest
import torch

from methods.evaluation import accuracy_ci, check_adversarial, evaluate_cell
from methods.results import read_result
from methods.subsets import stratified_subset
from methods.threat import ThreatModel
from tests.test_training import run, tiny_cell


def test_exact_binomial_interval():
    ci = accuracy_ci(50, 100)
    assert ci["acc"] == 0.5
    assert ci["ci95"] == pytest.approx([0.3983, 0.6017], abs=1e-4)  # Clopper-Pearson
    assert accuracy_ci(0, 20)["ci95"][0] == 0.0 and accuracy_ci(20, 20)["ci95"][1] == 1.0


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


@pytest.fixture(scope="module")
def trained(mnist5k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cell = tiny_cell("pgd_at", {"steps": 3, "alpha": 0.1}, epochs=2)
    cell["train"]["max_steps_per_epoch"] = 20
    cell["evaluation"]["autoattack"] = {
        "version": "custom", "attacks": ["apgd-ce"], "n": 30, "seed": 0,
        "compare_pgd": {"name": "pgd", "steps": 20, "alpha": 0.05, "restarts": 2}}
    from methods.config import config_hash
    cell["config_hash"] = config_hash({k: v for k, v in cell.items() if k != "config_hash"})
    run(cell, mnist5k_prepared, out)
    return mnist5k_prepared, out


@pytest.mark.parametrize("checkpoint", ["last", "best"])
def test_evaluation_record_is_guarded_and_complete(trained, checkpoint):
    root, out = trained
    rec = evaluate_cell(out / "train.json", checkpoint, root / "data", root / "prepared",
                        out / f"eval_{checkpoint}.json")
    assert read_result(out / f"eval_{checkpoint}.json", "eval_result.schema.json") == rec
    assert rec["checkpoint"]["name"] == checkpoint
    assert rec["guards"]["buffers_unchanged"] and rec["guards"]["eval_mode"]
    assert rec["metrics"]["PGD-5-2"]["max_distance"] <= 0.3 + 1e-6
    assert rec["metrics"]["PGD-5-2"]["acc"] <= rec["metrics"]["clean"]["acc"]
    aa = rec["autoattack"]
    assert len(aa["indices"]) == 30 and aa["indices"] == sorted(aa["indices"])
    # The same examples under PGD: a correct AutoAttack is at least as strong as PGD.
    assert aa["acc"] <= aa["pgd_same_subset"]["acc"] + 1e-12
    assert aa["package"] == "pyautoattack"


def test_published_rows_match_dataset_and_eps_exactly():

    from methods.config import REPO_ROOT
    from methods.tables import load_published, published_for

    pub = load_published([REPO_ROOT / "paper_tables/published/bb_nfgsm_fgsmrs_pgd_selective.csv"])
    rows = [{"paper": "lp-FGSM README (third-party report of N-FGSM)", "eps": "8/255"}]
    cell = {"dataset": {"source": "cifar10"}, "threat": {"eps": 8 / 255}, "published": {"rows": rows}}
    got = {(r["dataset"], r["value"]) for r in published_for(cell, pub)}
    assert got == {("CIFAR-10", "81.64"), ("CIFAR-10", "49.51")}  # not CIFAR-100's rows
    cell["threat"]["eps"] = 2 / 255
    assert published_for(cell, pub) == []
