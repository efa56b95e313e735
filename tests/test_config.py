"""Layered configuration: recipes, extends, sweeps, fractions, cells and the two identities."""
import copy

import pytest

from methods.config import (ConfigError, config_hash, iter_cells, load_recipes, load_yaml,
                            number, recipe_annotations, resolve_cell, resolve_evaluation,
                            REPO_ROOT)

BASE = {
    "datasets": {"d": {"source": "mnist5k"}},
    "archs": {"a": {"model": "smallcnn", "width": 0.5}},
    "evaluation": {"attacks": [{"name": "pgd", "steps": 10, "alpha": "2/255"}]},
    "recipes": {
        "parent": {"method": "nfgsm", "threat": {"norm": "linf", "eps": "8/255"},
                   "method_args": {"k": 2}, "train": {"epochs": 30, "batch_size": 128}},
        "child": {"extends": "parent", "method_args": {"alpha_ratio": 1.0},
                  "train": {"epochs": 10}},
        "swept": {"extends": "parent",
                  "sweep": {"k": {"path": "method_args.k", "values": {"k1": 1, "k3": 3}}}},
    },
    "cells": [{"datasets": ["d"], "archs": ["a"], "recipes": ["child", "swept-k3"], "seeds": [0, 1]}],
}


def test_extends_deep_merges_child_over_parent():
    r = load_recipes(BASE)["child"]
    assert r["method_args"] == {"k": 2, "alpha_ratio": 1.0}
    assert r["train"] == {"epochs": 10, "batch_size": 128}


def test_sweep_adds_one_recipe_per_value():
    rs = load_recipes(BASE)
    assert rs["swept-k1"]["method_args"]["k"] == 1 and rs["swept-k3"]["method_args"]["k"] == 3
    assert rs["swept"]["method_args"]["k"] == 2


def test_a_sweep_is_not_inherited_through_extends():
    config = {**BASE, "recipes": {**BASE["recipes"],
                                  "heir": {"extends": "swept", "method_args": {"k": 3}}}}
    rs = load_recipes(config)
    assert rs["heir"]["method_args"]["k"] == 3
    assert not [name for name in rs if name.startswith("heir-")]
    assert "sweep" not in rs["heir"]


def test_recipe_overrides_apply_to_every_recipe():
    rs = load_recipes({**BASE, "recipe_overrides": {"train": {"epochs": 1}}})
    assert all(r["train"]["epochs"] == 1 for r in rs.values())


def test_fractions_become_numbers_and_bad_values_name_the_field():
    cell = resolve_cell(BASE, "d", "a", "child", 0)
    assert cell["threat"]["eps"] == pytest.approx(8 / 255)
    assert resolve_evaluation(BASE, "child")["attacks"][0]["alpha"] == pytest.approx(2 / 255)
    assert number("0.5/2", "x") == 0.25
    with pytest.raises(ConfigError, match="threat.eps"):
        number("eight", "threat.eps")


def test_cells_and_hash():
    cells = list(iter_cells(BASE))
    assert cells == [("d", "a", "nfgsm", "child", 0), ("d", "a", "nfgsm", "child", 1),
                     ("d", "a", "nfgsm", "swept-k3", 0), ("d", "a", "nfgsm", "swept-k3", 1)]
    c0, c1 = resolve_cell(BASE, "d", "a", "child", 0), resolve_cell(BASE, "d", "a", "child", 1)
    assert c0["train_hash"] != c1["train_hash"]
    again = resolve_cell(BASE, "d", "a", "child", 0)
    assert again["train_hash"] == c0["train_hash"]
    body = {k: v for k, v in c0.items() if k != "train_hash"}
    assert config_hash(body) == c0["train_hash"]


def _with(config, **changes):
    out = copy.deepcopy(config)
    for dotted, value in changes.items():
        *keys, last = dotted.split("__")
        node = out
        for key in keys:
            node = node.setdefault(key, {})
        node[last] = value
    return out


@pytest.mark.parametrize("change", [
    {"evaluation__attacks": [{"name": "fgsm"}]},                 # a new attack list
    {"evaluation__autoattack": {"version": "standard", "n": 7}},  # AutoAttack subset size
    {"recipes__child__evaluation": {"n": 50}},                   # a recipe's own evaluation
    {"recipes__child__notes": "a new note"},
    {"recipes__child__paper": "another citation"},
    {"recipes__child__published": {"rows": [{"paper": "X"}]}},
    {"threads": 8}, {"device": "cpu"}, {"meter": "null"},        # where it runs
])
def test_evaluation_notes_and_execution_settings_leave_the_training_identity(change):
    changed = _with(BASE, **change)
    assert resolve_cell(changed, "d", "a", "child", 0) == resolve_cell(BASE, "d", "a", "child", 0)


@pytest.mark.parametrize("change", [
    {"recipes__child__train": {"epochs": 11}},
    {"recipes__child__method_args": {"alpha_ratio": 0.5}},
    {"recipes__child__threat": {"eps": "4/255"}},
    {"recipes__child__normalization": "none"},
    {"datasets__d__val_size": 100},
    {"archs__a__width": 0.25},
    {"amp": "bf16"}, {"channels_last": True}, {"compile": True},  # change the arithmetic
])
def test_training_settings_change_the_training_identity(change):
    changed = _with(BASE, **change)
    assert (resolve_cell(changed, "d", "a", "child", 0)["train_hash"]
            != resolve_cell(BASE, "d", "a", "child", 0)["train_hash"])


def test_evaluation_identity_merges_recipe_over_config_and_hashes_it():
    config = _with(BASE, recipes__child__evaluation={"n": 50}, evaluation__checkpoints=["last"])
    spec = resolve_evaluation(config, "child")
    assert spec["n"] == 50 and spec["attacks"] == resolve_evaluation(BASE, "child")["attacks"]
    assert "checkpoints" not in spec   # which outputs exist, not how one is computed
    assert spec["eval_hash"] == config_hash({k: v for k, v in spec.items() if k != "eval_hash"})
    assert spec["eval_hash"] != resolve_evaluation(BASE, "child")["eval_hash"]
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        resolve_evaluation(BASE, "nope")


def test_recipe_evaluation_of_the_run_config_wins_for_that_recipe_only():
    """claims.yaml gives AutoAttack to a few recipes: their evaluation identity changes, the
    others' and every training identity do not."""
    config = _with(BASE, recipes__child__evaluation={"n": 50},
                   recipe_evaluation={"child": {"n": 7, "seed": 3}})
    spec = resolve_evaluation(config, "child")
    assert (spec["n"], spec["seed"]) == (7, 3)           # over the recipe's own n = 50
    plain = _with(BASE, recipes__child__evaluation={"n": 50})
    assert spec["eval_hash"] != resolve_evaluation(plain, "child")["eval_hash"]
    assert resolve_evaluation(config, "swept-k3") == resolve_evaluation(plain, "swept-k3")
    assert resolve_cell(config, "d", "a", "child", 0) == resolve_cell(plain, "d", "a", "child", 0)


def test_evaluation_identity_normalizes_attacks_and_rejects_bad_ones_early():
    spelled = _with(BASE, evaluation__attacks=[{"name": "pgd", "steps": 10, "alpha": 2 / 255,
                                               "restarts": 1, "early_stop": True}])
    assert resolve_evaluation(spelled, "child") == resolve_evaluation(BASE, "child")
    bad = _with(BASE, evaluation__attacks=[{"name": "pgd", "steps": 10}])
    with pytest.raises(ConfigError, match=r"recipe 'child': evaluation.attacks\[0\].alpha: missing"):
        resolve_evaluation(bad, "child")
    twice = _with(BASE, evaluation__attacks=[{"name": "fgsm"}, {"name": "fgsm"}])
    with pytest.raises(ConfigError, match="same label 'FGSM'"):
        resolve_evaluation(twice, "child")


def test_annotations_carry_text_and_published_links_for_the_tables():
    config = _with(BASE, recipes__child__notes="n", recipes__child__published={
        "rows": [{"paper": "P", "eps": "8/255"}]})
    notes = recipe_annotations(load_recipes(config), ["child", "child"])
    assert list(notes) == ["child"]
    assert notes["child"]["notes"] == "n"
    assert notes["child"]["published"]["rows"][0]["eps"] == "8/255"   # matched as CSV text


@pytest.mark.parametrize("bad,match", [
    ({"cells": [{"datasets": ["nope"], "archs": ["a"], "recipes": ["child"], "seeds": [0]}]}, "unknown dataset 'nope'"),
    ({"cells": [{"datasets": ["d"], "archs": ["a"], "recipes": ["child"]}]}, "missing field 'seeds'"),
    ({"recipes": {"x": {"extends": "y"}}}, "extends unknown recipe 'y'"),
    ({"recipes": {"x": {"extends": "z"}, "z": {"extends": "x"}}}, "circular"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        list(iter_cells({**BASE, **bad}))


@pytest.mark.parametrize("name", ["default.yaml", "paper.yaml", "smoke.yaml", "ablations.yaml",
                                  "mnist5k_comparisons.yaml"])
def test_shipped_configs_resolve_every_cell(name):
    path = REPO_ROOT / "workflow" / "config" / name
    config = load_yaml(path)
    cells = list(iter_cells(config))
    recipes = load_recipes(config)
    assert cells
    for d, a, m, r, s in cells:
        assert resolve_cell(config, d, a, r, s, recipes)["method"] == m
