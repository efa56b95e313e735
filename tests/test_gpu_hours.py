"""methods.gpu_hours: the anchor arithmetic, counted / measured overrides, the config's cells."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from methods import gpu_hours as gh
from methods.config import REPO_ROOT, cell_dir, iter_cells, resolve_cell, resolve_evaluation

PAPER = REPO_ROOT / "workflow" / "config" / "paper.yaml"

BASE = {
    "run_name": "t",
    "results_dir": "results",
    "datasets": {"cifar10": {"source": "cifar10", "val_size": 0},
                 "mnist5k": {"source": "mnist5k"}},
    "archs": {"prn18": {"model": "preactresnet18"},
              "wrn": {"model": "wrn", "depth": 28, "widen_factor": 10}},
    "recipes": {
        "fgsm_rs_wong": {"method": "fgsm_rs", "threat": {"norm": "linf", "eps": "8/255"},
                         "train": {"epochs": 15, "batch_size": 100, "optimizer": {"lr": 0.2}}},
        "pgd3": {"method": "pgd_at", "method_args": {"steps": 3, "alpha": "2/255"},
                 "threat": {"norm": "linf", "eps": "8/255"},
                 "train": {"epochs": 4, "batch_size": 100, "optimizer": {"lr": 0.1}}},
    },
    "cells": [{"datasets": ["cifar10"], "archs": ["prn18"], "recipes": ["fgsm_rs_wong", "pgd3"],
               "seeds": [0]}],
    "evaluation": {"checkpoints": ["last"], "attacks": [{"name": "fgsm"}],
                   "autoattack": {"version": "standard", "n": 100, "seed": 0}},
}


def config():
    return copy.deepcopy(BASE)


def rows_by_recipe(cfg, results=()):
    return {r.cell[3]: r for r in gh.estimate(gh.load_config_dict(cfg), [Path(p) for p in results])}


def test_anchor_arithmetic_fgsm_rs_prn18_cifar10_15_epochs_is_0_2_hours():
    # Wong et al. 2020: 15 epochs x 50,000 images x 2 fwd+bwd in 12 minutes
    assert gh.ANCHOR_PASS_SECONDS == pytest.approx(720 / 1.5e6)
    assert gh.anchor_check_hours() == pytest.approx(0.2)
    row = rows_by_recipe(config())["fgsm_rs_wong"]       # the same run as a cell (B = 100)
    assert (row.train_fwd, row.train_bwd) == (15 * 50_000 * 2, 15 * 50_000 * 2)
    assert row.train_source == "analytic"
    method_s = gh.fb_equivalent(row.train_fwd, row.train_bwd) * row.pass_s
    assert method_s / 3600 == pytest.approx(0.2)
    # the GPU time adds the per-epoch monitor: 15 x 256 images x (10 PGD steps + 2 forwards)
    assert row.train_s == pytest.approx(method_s + 15 * 256 * (10 + 2 / 3) * row.pass_s)


def test_other_archs_scale_by_forward_macs_and_forwards_cost_a_third():
    prn = {"model": "preactresnet18"}
    wrn = {"model": "wrn", "depth": 28, "widen_factor": 10, "variant": "bearpaw"}
    ratio = gh.pass_seconds(wrn, "3x32x32") / gh.pass_seconds(prn, "3x32x32")
    assert ratio == pytest.approx(5.25 / 0.56, rel=0.02)          # published GMACs
    meliketoy = gh.pass_seconds({**wrn, "variant": "meliketoy"}, "3x32x32")
    assert meliketoy > gh.pass_seconds(wrn, "3x32x32")            # strides its 2nd conv
    # a shape not listed: scaled from the listed one by pixel count
    vgg = gh.pass_seconds({"model": "vgg19_bn"}, "3x16x16")
    assert vgg == pytest.approx(gh.pass_seconds({"model": "vgg19_bn"}, "3x32x32") / 4)
    assert gh.fb_equivalent(7, 4) == pytest.approx(4 + 3 / 3)


def test_evaluation_passes_follow_the_attack_and_autoattack_budgets():
    ev = {"attacks": [{"name": "pgd", "steps": 50, "restarts": 10}],
          "autoattack": {"version": "standard", "n": 100}}
    # clean n/3, PGD-50-10: 10 x 50 + 10/3 per example; AutoAttack: 100 + 900 + 900 + 5000/3
    expected = 1000 / 3 + 1000 * (500 + 10 / 3) + 100 * (100 + 900 + 900 + 5000 / 3)
    assert gh.evaluation_passes(ev, 1000, 10) == pytest.approx(expected)
    two_classes = gh.autoattack_budget({"version": "standard"}, 2)
    assert two_classes == pytest.approx(100 + 100 + 100 + 5000 / 3)
    assert gh.autoattack_budget({"version": "rand"}, 10) == 2 * 100 * 20
    # half the examples left after APGD-CE: the later sub-attacks cost half
    half = gh.autoattack_budget({"version": "standard"}, 10, robust_fraction=0.5)
    assert half == pytest.approx(100 + 0.5 * (900 + 900 + 5000 / 3))


def test_analytic_counts_of_the_multi_pass_methods():
    rates, _ = gh.analytic_rates("pgd_at", {"steps": 10}, 128, 390)
    assert rates.steady == (11, 11)
    rates, note = gh.analytic_rates("bb", {"m": 5, "selection": "cp"}, 128, 390)
    assert rates.steady == (5 + 5 + 1, 5 + 1) and not note
    rates, note = gh.analytic_rates("bb", {"m": 5, "selection": "gs"}, 128, 390)
    assert rates.steady == (15, 10) and "upper bound" in note
    args = {"rho": 0.25, "steps": 40, "warmup_epochs": 2}
    rates, _ = gh.analytic_rates("selective", args, 100, 35)     # the README's 12.05+11.25 run
    assert rates.steady == (12.25, 11.25) and rates.warm == (11.25, 11.25)
    assert rates.warm_epochs == 2
    rates, _ = gh.analytic_rates("iat", {"steps": 10, "attack_labels": "predicted"}, 128, 390)
    assert rates.steady == (13, 12)


def _train_json(path: Path, method, method_args, described, per_epoch, epochs=2, examples=100,
                train_hash="x", gpu_s=None):
    fwd, bwd = per_epoch
    record = {
        "cell": {"method": method, "method_args": method_args, "train_hash": train_hash},
        "method": {"name": method, "paper": "p", **described},
        "history": [{"epoch": e, "examples": examples,
                     "passes": {"attack": {"forward": int((fwd - 1) * examples),
                                           "backward": int((bwd - 1) * examples)},
                                "train": {"forward": examples, "backward": examples}}}
                    for e in range(epochs)],
        "measurement": {"records": [{"name": "run", "path": "run", "wall_s": 1.0, "cpu_s": 1.0,
                                     "gpu_s": gpu_s}], "previous_sessions": []},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_measured_pass_count_overrides_the_analytic_one(tmp_path):
    cfg = config()
    analytic = rows_by_recipe(cfg)["pgd3"]
    assert analytic.train_source == "analytic" and analytic.train_fwd == 4 * 50_000 * 4
    # a PGD-3 run on another dataset and arch counted 5 forward + 4.5 backward per example
    _train_json(tmp_path / "mnist5k/smallcnn/pgd_at/other/seed0/train.json", "pgd_at",
                {"steps": 3}, {"steps": 3, "alpha": 0.1}, (5, 4.5))
    # ... and a PGD-7 run that must not be used for PGD-3
    _train_json(tmp_path / "mnist5k/smallcnn/pgd_at/seven/seed0/train.json", "pgd_at",
                {"steps": 7}, {"steps": 7}, (99, 99))
    counted = rows_by_recipe(cfg, [tmp_path])["pgd3"]
    assert counted.train_source == counted.source == "counted"
    assert (counted.train_fwd, counted.train_bwd) == (4 * 50_000 * 5, 4 * 50_000 * 4.5)
    assert counted.train_s > analytic.train_s


def test_measured_gpu_seconds_override_counted_and_analytic(tmp_path):
    cfg = gh.load_config_dict(config())
    recipes = gh.load_recipes(cfg)
    cell = ("cifar10", "prn18", "pgd_at", "pgd3", 0)
    train_hash = resolve_cell(cfg, "cifar10", "prn18", "pgd3", 0, recipes)["train_hash"]
    base = Path(cell_dir(str(tmp_path), *cell))
    _train_json(base / "train.json", "pgd_at", {"steps": 3}, {"steps": 3}, (5, 4.5),
                train_hash=train_hash, gpu_s=1000.0)
    record = json.loads((base / "train.json").read_text())
    record["measurement"]["previous_sessions"] = [          # a resumed job: earlier epochs too
        {"name": "epoch_000", "path": "run/train/epoch_000", "wall_s": 1, "cpu_s": 1,
         "gpu_s": 800.0}]
    (base / "train.json").write_text(json.dumps(record))
    eval_hash = resolve_evaluation(cfg, "pgd3", recipes)["eval_hash"]
    (base / "eval_last.json").write_text(json.dumps({
        "cell": {"train_hash": train_hash}, "evaluation": {"eval_hash": eval_hash},
        "measurement": {"records": [
            {"name": "evaluate", "path": "run/evaluate", "wall_s": 1, "cpu_s": 1, "gpu_s": 500.0},
            {"name": "run", "path": "run", "wall_s": 1, "cpu_s": 1, "gpu_s": 900.0}]}}))
    row = rows_by_recipe(cfg, [tmp_path])["pgd3"]
    assert row.source == "measured" and row.train_source == "measured"
    assert (row.train_s, row.eval_s) == (1800.0, 900.0) and row.gpu_hours == pytest.approx(0.75)
    # the pass count of that run is still the counted one; another identity is not "measured"
    assert row.train_fwd == 4 * 50_000 * 5
    stale = copy.deepcopy(cfg)
    stale["recipes"]["pgd3"]["train"]["epochs"] = 5
    other = rows_by_recipe(stale, [tmp_path])["pgd3"]
    assert other.train_source == "counted" and other.eval_source == "estimated"


def test_paper_config_expands_to_the_snakefile_cells_and_a_group_overlay_selects_its_own(tmp_path):
    cfg = gh.load_config(PAPER)
    rows = gh.estimate(cfg, [tmp_path / "none"])
    assert [r.cell for r in rows] == list(iter_cells(cfg))     # the Snakefile's CELLS
    assert {r.group for r in rows} >= {"baselines", "bb", "selective", "mixup", "batchout",
                                       "layerwise", "iada"}
    gh.write_selection(tmp_path / "sel", "workflow/config/paper.yaml", cfg, rows)
    overlay = tmp_path / "sel" / "paper-layerwise.yaml"
    results = tmp_path / "results"
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(PAPER), str(overlay),
         "--config", f"results_dir={results}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = set(re.findall(re.escape(str(results)) + r"/([^/\s]+)/([^/\s]+)/([^/\s]+)/([^/\s]+)"
                            r"/seed(\d+)/train\.json", out.stdout))
    wanted = {(d, a, m, r, str(s)) for d, a, m, r, s in (x.cell for x in rows
                                                          if x.group == "layerwise")}
    assert listed == wanted and len(wanted) == 6
    targets = (tmp_path / "sel" / "paper-layerwise.targets").read_text().split()
    assert len(targets) == 6 * 2 and all(t.endswith((".json")) for t in targets)


def test_the_command_imports_no_torch(tmp_path):
    code = ("import sys; from methods.gpu_hours import main; "
            f"rc = main(['--configfile', {str(PAPER)!r}, '--results', {str(tmp_path)!r}, "
            f"'--markdown', {str(tmp_path / 'out.md')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "out.md").read_text()
    assert "| **total** |" in text and "--profile workflow/profiles/slurm" in text
