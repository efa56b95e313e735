"""Layered configuration: recipes, extends, sweeps, fractions, cells and hashes."""
import pytest

from methods.config import (ConfigError, config_hash, iter_cells, load_recipes, load_yaml,
                            number, resolve_cell, REPO_ROOT)

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


def test_recipe_overrides_apply_to_every_recipe():
    rs = load_recipes({**BASE, "recipe_overrides": {"train": {"epochs": 1}}})
    assert all(r["train"]["epochs"] == 1 for r in rs.values())


def test_fractions_become_numbers_and_bad_values_name_the_field():
    cell = resolve_cell(BASE, "d", "a", "child", 0)
    assert cell["threat"]["eps"] == pytest.approx(8 / 255)
    assert cell["evaluation"]["attacks"][0]["alpha"] == pytest.approx(2 / 255)
    assert number("0.5/2", "x") == 0.25
    with pytest.raises(ConfigError, match="threat.eps"):
        number("eight", "threat.eps")


def test_cells_and_hash():
    cells = list(iter_cells(BASE))
    assert cells == [("d", "a", "nfgsm", "child", 0), ("d", "a", "nfgsm", "child", 1),
                     ("d", "a", "nfgsm", "swept-k3", 0), ("d", "a", "nfgsm", "swept-k3", 1)]
    c0, c1 = resolve_cell(BASE, "d", "a", "child", 0), resolve_cell(BASE, "d", "a", "child", 1)
    assert c0["config_hash"] != c1["config_hash"]
    again = resolve_cell(BASE, "d", "a", "child", 0)
    assert again["config_hash"] == c0["config_hash"]
    body = {k: v for k, v in c0.items() if k != "config_hash"}
    assert config_hash(body) == c0["config_hash"]


@pytest.mark.parametrize("bad,match", [
    ({"cells": [{"datasets": ["nope"], "archs": ["a"], "recipes": ["child"], "seeds": [0]}]}, "unknown dataset 'nope'"),
    ({"cells": [{"datasets": ["d"], "archs": ["a"], "recipes": ["child"]}]}, "missing field 'seeds'"),
    ({"recipes": {"x": {"extends": "y"}}}, "extends unknown recipe 'y'"),
    ({"recipes": {"x": {"extends": "z"}, "z": {"extends": "x"}}}, "circular"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        list(iter_cells({**BASE, **bad}))


@pytest.mark.parametrize("name", ["default.yaml", "paper.yaml", "smoke.yaml", "ablations.yaml"])
def test_shipped_configs_resolve_every_cell(name):
    path = REPO_ROOT / "workflow" / "config" / name
    config = load_yaml(path)
    cells = list(iter_cells(config))
    recipes = load_recipes(config)
    assert cells
    for d, a, m, r, s in cells:
        assert resolve_cell(config, d, a, r, s, recipes)["method"] == m
