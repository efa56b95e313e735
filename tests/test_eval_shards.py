"""Sharded AutoAttack evaluation (``evaluation.autoattack.shards``, methods/eval_shards.py).

The merged shards must equal the unsharded evaluation example for example (flags, accuracies,
per-attack accuracies, warnings, PGD on the same subset); a shard killed mid-way (after some
examples were broken, the state in which the package's own resume path loses ``y_adv``) resumes
to the same flags; the Snakemake DAG gets K jobs per sub-attack plus the PGD parts feeding
``evaluate``, and the unsharded DAG is unchanged; a bad ``shards`` is refused with one message.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
import yaml

import pyautoattack

from methods.attack_specs import normalize_attack_spec
from methods.config import ConfigError, REPO_ROOT, load_yaml, resolve_cell, resolve_evaluation
from methods.config_checks import check_config
from methods.eval_core import run_attack
from methods.eval_shards import (PGD_PART, VERSION_ATTACKS, advance_generator, autoattack_identity,
                                 check_shards, final_shard_files, pgd_parts, previous_stage_files,
                                 run_shard, shard_count, shard_file, stage_attacks)
from methods.evaluation import evaluate_cell
from methods.registry import ATTACKS
from methods.results import read_result
from methods.runtime import cpu_generator
from methods.threat import ThreatModel
from methods.training import train_cell
from tests.test_workflow_e2e import planned_jobs, snakemake

K = 3
CONFIG = {
    "datasets": {"mnist5k": {"source": "mnist5k"}},
    "archs": {"smallcnn-tiny": {"model": "smallcnn", "width": 0.125}},
    "recipes": {"tiny": {   # 15 of AutoAttack's 20 examples right, 6 left by APGD-DLR, 5 by CE
        "method": "standard", "method_args": {},
        "threat": {"norm": "linf", "eps": 0.1}, "normalization": "none", "augmentation": "none",
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.005},
                  "monitor": {"n": 20, "steps": 1}}}},
    "cells": [{"datasets": ["mnist5k"], "archs": ["smallcnn-tiny"], "recipes": ["tiny"],
               "seeds": [0]}],
    # Batches of 4: the clean-correct examples of AutoAttack's 20 make the batches of stage 1
    # (the shards get 1, 1 and 2 of 4), the examples APGD-DLR leaves those of stage 2; PGD's 5
    # batches go to 3 parts (examples 0-3, 4-11, 12-19).
    "evaluation": {
        "checkpoints": ["last"], "batch_size": 4, "n": 8, "seed": 0,
        "threat": {"norm": "linf", "eps": 0.1},
        "attacks": [{"name": "fgsm"}],
        "autoattack": {"version": "custom", "attacks": ["apgd-dlr", "apgd-ce"], "n": 20,
                       "seed": 0, "shards": K,
                       "compare_pgd": {"name": "pgd", "steps": 4, "alpha": 0.04, "restarts": 2}}},
}


def unsharded(config):
    config = copy.deepcopy(config)
    del config["evaluation"]["autoattack"]["shards"]
    return config


@pytest.fixture(scope="module")
def trained(mnist5k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cell = resolve_cell(CONFIG, "mnist5k", "smallcnn-tiny", "tiny", 0)
    train_cell(cell, mnist5k_prepared / "data", mnist5k_prepared / "prepared", out,
               out / "train.json", device="cpu", threads=1, meter_backend="null")
    return mnist5k_prepared, out


def shard(trained, evaluation, part, i, n, where):
    """One shard job as the workflow runs it: its parameter is the AutoAttack identity."""
    root, out = trained
    cell = str(where)
    return run_shard(out / "train.json", autoattack_identity(evaluation, part), "last",
                     root / "data", root / "prepared", part, i, n,
                     previous_stage_files(cell, "last", evaluation, part),
                     shard_file(cell, "last", part, i, n), device="cpu", threads=1)


def all_shards(trained, evaluation, where):
    records = {}
    for s in range(1, len(stage_attacks(evaluation)) + 1):
        for i in range(shard_count(evaluation)):
            records[f"stage{s}", i] = shard(trained, evaluation, f"stage{s}", i, K, where)
    for j in range(pgd_parts(evaluation)):
        records[PGD_PART, j] = shard(trained, evaluation, PGD_PART, j, pgd_parts(evaluation), where)
    return records, final_shard_files(str(where), "last", evaluation)


def evaluate(trained, evaluation, path, **kwargs):
    root, out = trained
    return evaluate_cell(out / "train.json", evaluation, "last", root / "data", root / "prepared",
                         path, device="cpu", threads=1, meter_backend="null", **kwargs)


@pytest.fixture(scope="module")
def both(trained, tmp_path_factory):
    where = tmp_path_factory.mktemp("sharded")
    evaluation = resolve_evaluation(CONFIG, "tiny")
    records, files = all_shards(trained, evaluation, where)
    merged = evaluate(trained, evaluation, where / "eval_last.json", autoattack_shards=files)
    whole = evaluate(trained, resolve_evaluation(unsharded(CONFIG), "tiny"),
                     where / "eval_whole.json")
    return records, merged, whole, where


# ----------------------------------------------------------------------------- equality

def attacked(record, batch_size=4):
    """The examples (positions in the subset) a stage shard attacked."""
    first, end = record["batches"]
    return record["robust_before"][first * batch_size:end * batch_size]


def test_merged_shards_equal_the_unsharded_run_example_for_example(both):
    records, merged, whole, where = both
    aa, expected = copy.deepcopy(merged["autoattack"]), whole["autoattack"]
    shards = aa.pop("shards")
    assert aa == expected                       # flags, accuracies, per attack, warnings, PGD
    assert merged["metrics"] == whole["metrics"]
    # A real comparison: both stages broke examples, some stayed robust, PGD split in 3 parts.
    per_attack = expected["per_attack"]
    assert per_attack["clean"] > per_attack["apgd-dlr"] > per_attack["apgd-ce"] > 0, per_attack
    assert shards["count"] == K and shards["stages"] == ["apgd-dlr", "apgd-ce"]
    assert [j["part"] for j in shards["jobs"]] == ["stage1"] * K + ["stage2"] * K + ["pgd"] * 3
    assert [records[PGD_PART, j]["range"] for j in range(3)] == [[0, 4], [4, 12], [12, 20]]
    # Stage 2's batches are cut from the whole robust set, so they mix stage 1's shards.
    owner = {e: i for i in range(K) for e in attacked(records["stage1", i])}
    assert any(len({owner[e] for e in attacked(records["stage2", j])}) > 1 for j in range(K))
    assert sum(len(attacked(records["stage2", j])) for j in range(K)) \
        == round(per_attack["apgd-dlr"] * 20)
    assert not (where / "aa_last" / "stage1-shard0of3.partial").exists()   # removed when done


def test_version_attacks_are_the_packages():
    for norm in ("Linf", "L2"):
        for version, attacks in VERSION_ATTACKS.items():
            adversary = pyautoattack.AutoAttack(nn.Identity(), norm=norm, version=version, seed=0)
            assert adversary.attacks_to_run == attacks, (norm, version)
    assert stage_attacks({"autoattack": {"version": "custom", "attacks": ["square"]}}) == ["square"]


def test_a_pgd_part_draws_what_the_whole_run_drew_before_it():
    """The generator advanced over the earlier batches (no steps, a zero model) is exactly the
    state the whole run has there: random starts, restarts, random targets, L2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(20, 1, 4, 4, generator=g), torch.randint(0, 10, (20,), generator=g)
    for spec, norm in (({"name": "pgd", "steps": 2, "alpha": 0.05, "restarts": 2}, "linf"),
                       ({"name": "pgd", "steps": 2, "alpha": 0.05, "targeted": "random"}, "l2")):
        spec, threat = normalize_attack_spec(spec), ThreatModel(norm, 0.1)
        states = []

        class Record:
            def load(self):
                return None

            def save(self, progress):
                states.append(progress["generator"].clone())
        run_attack(model, spec, threat, x, y, 4, 7, "whole", resume=Record())
        for batches in (1, 3):
            generator = cpu_generator(7)
            advance_generator(generator, spec, threat, x, y, 4, 4 * batches, 10)
            assert torch.equal(generator.get_state(), states[batches - 1])


# ----------------------------------------------------------------------------- a killed shard

class Killed(BaseException):
    """Stands for a kill inside a shard job."""


def test_a_shard_killed_mid_way_resumes_to_the_same_flags(both, trained, tmp_path, monkeypatch):
    records, _, _, _ = both
    evaluation = resolve_evaluation(CONFIG, "tiny")
    # Stage 1's shard with two batches and a broken example in its first: killed in its second
    # batch, the saved state has flags set (where the package's resume loses y_adv).
    i = next(i for i in range(K) if records["stage1", i]["batches"][1]
             - records["stage1", i]["batches"][0] == 2)
    calls = []
    run = pyautoattack.AutoAttack.run_standard_evaluation

    def dying(self, x, y, **kwargs):
        calls.append(len(x))
        if len(calls) == 2:
            raise Killed("killed in the second batch")
        return run(self, x, y, **kwargs)
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", dying)
    with pytest.raises(Killed):
        shard(trained, evaluation, "stage1", i, K, tmp_path)
    state = torch.load(tmp_path / "aa_last" / f"stage1-shard{i}of{K}.partial" / "autoattack.state.pt",
                       weights_only=True)
    assert state["current"]["batches"] == 1 and not state["robust"].all()
    calls.clear()
    resumed = shard(trained, evaluation, "stage1", i, K, tmp_path)
    assert len(calls) == 1                               # only the batch that was running
    assert resumed["resumed"] and resumed["broken"] == records["stage1", i]["broken"]
    assert resumed["robust_before"] == records["stage1", i]["robust_before"]
    monkeypatch.undo()

    # PGD part 1 (two batches) killed in its second batch.
    inner, pgd_calls = ATTACKS.get("pgd"), []

    def dying_pgd(model, x, y, spec, *args, **kwargs):
        if spec["steps"]:                  # not the generator's advance over earlier batches
            pgd_calls.append(len(x))
            if len(pgd_calls) == 2:
                raise Killed("killed in PGD's second batch")
        return inner(model, x, y, spec, *args, **kwargs)
    monkeypatch.setitem(ATTACKS._items, "pgd", dying_pgd)
    with pytest.raises(Killed):
        shard(trained, evaluation, PGD_PART, 1, 3, tmp_path)
    pgd_calls.clear()
    again = shard(trained, evaluation, PGD_PART, 1, 3, tmp_path)
    assert pgd_calls == [4] and again["resumed"]
    assert again["flags"] == records[PGD_PART, 1]["flags"]
    assert again["max_distance"] == records[PGD_PART, 1]["max_distance"]


def test_the_command_line_runs_a_shard(both, trained, tmp_path):
    """``python -m methods evaluate-shard`` as the rule calls it (here in-process): PGD part 2."""
    from methods.cli import main

    records, _, _, _ = both
    root, out = trained
    identity = autoattack_identity(resolve_evaluation(CONFIG, "tiny"), PGD_PART)
    path = tmp_path / "aa_last" / "pgd-shard2of3.json"
    assert main(["evaluate-shard", "--train-result", str(out / "train.json"), "--checkpoint",
                 "last", "--evaluation", json.dumps(identity), "--part", "pgd", "--shard", "2",
                 "--shards", "3", "--previous", "--data-dir", str(root / "data"),
                 "--prepared-dir", str(root / "prepared"), "--result", str(path),
                 "--device", "cpu", "--threads", "1"]) == 0
    assert json.loads(path.read_text())["flags"] == records[PGD_PART, 2]["flags"]
    with pytest.raises(ValueError, match="this evaluation has 3 PGD parts"):
        main(["evaluate-shard", "--train-result", str(out / "train.json"), "--evaluation",
              json.dumps(identity), "--part", "pgd", "--shard", "0", "--shards", "2",
              "--data-dir", str(root / "data"), "--prepared-dir", str(root / "prepared"),
              "--result", str(path)])


def test_shard_files_of_another_run_are_refused(both, trained, tmp_path):
    records, _, _, where = both
    evaluation = resolve_evaluation(CONFIG, "tiny")
    files = final_shard_files(str(where), "last", evaluation)
    other = copy.deepcopy(CONFIG)
    other["evaluation"]["autoattack"]["seed"] = 1       # another subset, another identity
    with pytest.raises(ValueError, match="another AutoAttack identity"):
        evaluate(trained, resolve_evaluation(other, "tiny"), tmp_path / "e.json",
                 autoattack_shards=files)
    with pytest.raises(ValueError, match="expected 0..2"):
        evaluate(trained, evaluation, tmp_path / "e.json", autoattack_shards=files[1:])


# ----------------------------------------------------------------------------- bad shards

@pytest.mark.parametrize("shards, batch_size, expected", [
    (0, None, "evaluation.autoattack.shards: got 0; allowed: an integer >= 1"),
    (30, None, "evaluation.autoattack.shards: got 30; allowed: an integer from 1 to 5: "
               "AutoAttack's n = 20 examples make 5 batches of batch_size 4"),
    (2, 20, "evaluation.autoattack.shards: got 2; allowed: an integer from 1 to 1"),
])
def test_a_bad_shard_count_is_refused(shards, batch_size, expected):
    config = copy.deepcopy(CONFIG)
    config["evaluation"]["autoattack"]["shards"] = shards
    if batch_size:
        config["evaluation"]["autoattack"]["batch_size"] = batch_size
    with pytest.raises(ConfigError) as raised:
        check_config(config)
        check_shards(resolve_evaluation(config, "tiny"))
    assert expected in str(raised.value)
    if shards > 20:
        assert "more shards than examples" in str(raised.value)


# ----------------------------------------------------------------------------- through Snakemake

def smoke_config(tmp_path, shards):
    config = load_yaml(REPO_ROOT / "workflow" / "config" / "smoke.yaml")
    config["cells"][0]["recipes"] = ["standard_mnist"]
    config["evaluation"]["checkpoints"] = ["last"]
    aa = config["evaluation"]["autoattack"]
    aa.update(attacks=["apgd-ce", "apgd-dlr"], batch_size=5)
    del aa["compare_pgd"]                      # its parts run in-process above: one job less
    if shards:
        aa["shards"] = shards
    path = tmp_path / f"shards{shards}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def test_snakemake_plans_k_jobs_per_stage_into_evaluate(tmp_path):
    """Dry runs: K jobs per sub-attack feeding evaluate; none without shards (the unsharded
    DAG is unchanged); a bad shard count stops Snakemake before anything runs."""
    results, data = tmp_path / "results", tmp_path / "data"
    overrides = ["--config", f"results_dir={results}", f"data_dir={data}"]
    plain, _ = smoke_config(tmp_path, None)
    done = snakemake("-n", "--cores", "1", "--configfile", str(plain), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate_autoattack_shard" not in planned_jobs(done.stdout + done.stderr)

    path, config = smoke_config(tmp_path, 2)
    done = snakemake("-n", "--cores", "1", "--configfile", str(path), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = planned_jobs(done.stdout + done.stderr)
    # Two stages (APGD-CE, APGD-DLR) of 2 shards each.
    assert plan["evaluate_autoattack_shard"] == 2 * 2 and plan["evaluate"] == 1, plan

    config["evaluation"]["autoattack"]["shards"] = 9
    path.write_text(yaml.safe_dump(config))
    bad = snakemake("-n", "--cores", "1", "--configfile", str(path), *overrides)
    assert bad.returncode != 0
    assert "evaluation.autoattack.shards: got 9; allowed: an integer from 1 to 4" \
        in bad.stdout + bad.stderr, (bad.stdout + bad.stderr)[-3000:]
    assert not results.exists() and not data.exists()


@pytest.mark.slow   # 93 s here beside another workflow run (job start-ups dominate)
@pytest.mark.e2e
def test_snakemake_sharded_run_equals_the_unsharded_evaluation(tmp_path):
    """One real run through the rules and the command line (prepare, train, 4 shard jobs,
    evaluate): the merged block equals the unsharded evaluation of the same weights."""
    results, data = tmp_path / "results", tmp_path / "data"
    overrides = ["--config", f"results_dir={results}", f"data_dir={data}"]
    path, config = smoke_config(tmp_path, 2)
    cell = results / "mnist5k" / "smallcnn-w0.125" / "standard" / "standard_mnist" / "seed0"
    done = snakemake(str(cell / "eval_last.json"), "--cores", "2", "--resources", "gpu=2",
                     "--configfile", str(path), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = read_result(cell / "eval_last.json", "eval_result.schema.json")["autoattack"]
    assert merged.pop("shards")["count"] == 2
    assert sorted(p.name for p in (cell / "aa_last").iterdir()) == [
        "stage1-shard0of2.json", "stage1-shard1of2.json", "stage2-shard0of2.json", "stage2-shard1of2.json"]
    whole = evaluate_cell(cell / "train.json",
                          resolve_evaluation(unsharded(config), "standard_mnist"), "last", data,
                          results / "data" / "mnist5k", tmp_path / "whole.json", device="cpu",
                          threads=1, meter_backend="null")
    assert merged == json.loads(json.dumps(whole["autoattack"]))
