"""The shipped configs and recipes: every cell resolves and builds its method, sweeps belong to
the recipe that declares them, the paper matrix follows the official scripts (N-FGSM
experiments.sh, train.py's SVHN branch, BB's schedules), and published links name CSV rows."""
import csv
from pathlib import Path

import pytest

from methods.builders import build_method, build_threat
from methods.config import REPO_ROOT, iter_cells, load_recipes, load_yaml, resolve_cell

CONFIG_DIR = REPO_ROOT / "workflow" / "config"
RUN_CONFIGS = ["default", "smoke", "paper", "ablations"]


def config(name):
    return load_yaml(CONFIG_DIR / f"{name}.yaml")


def bench_config():
    """bench.yaml has no cells: its base config plus its inline (bench-only) recipes."""
    bench = config("bench")
    base = load_yaml(REPO_ROOT / bench["base_config"])
    return {**base, "recipes": bench.get("recipes", {})}, bench


@pytest.fixture(scope="module")
def paper():
    cfg = config("paper")
    recipes = load_recipes(cfg)
    cells = [resolve_cell(cfg, d, a, r, s, recipes) for d, a, _, r, s in iter_cells(cfg)]
    return cfg, recipes, cells


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_listed_recipe_resolves_and_builds_its_method(name):
    cfg = config(name)
    recipes = load_recipes(cfg)
    cells = list(iter_cells(cfg))  # raises on an unknown dataset, arch or recipe
    assert cells
    for dataset, arch, method, recipe, seed in cells:
        cell = resolve_cell(cfg, dataset, arch, recipe, seed, recipes)
        assert cell["method"] == method
        built = build_method(cell, build_threat(cell["threat"]))   # unknown method_args raise
        assert built.name == method


def test_every_bench_recipe_resolves():
    cfg, bench = bench_config()
    recipes = load_recipes(cfg)
    for entry in bench["bench"]:
        assert (entry["recipe"] if isinstance(entry, dict) else entry) in recipes


def _recipe_files():
    files = set()
    for name in RUN_CONFIGS:
        files.update(config(name).get("recipe_files", []))
    return sorted(files)


def test_every_sweep_variant_comes_from_a_sweep_its_base_declares():
    """A sweep is not inherited through ``extends``: ``<base>-<suffix>`` exists only if
    ``<base>`` itself declares the sweep (no ``nfgsm_svhn_eps12-eps2`` with k = 3, no
    ``nfgsm_cifar_wrn_eps16-eps2`` with k = 4)."""
    raw = {}
    for rel in _recipe_files():
        raw.update(load_yaml(REPO_ROOT / rel)["recipes"])
    recipes = load_recipes({"recipe_files": _recipe_files()})
    for name in recipes:
        if "-" in name:
            base = name.split("-")[0]
            assert "sweep" in raw[base], f"{name}: {base} declares no sweep"
    for heir in ("nfgsm_svhn_eps12", "nfgsm_cifar_wrn_eps16", "nfgsm_svhn_wrn_eps10",
                 "nfgsm_svhn_wrn_eps12", "pgd10_svhn", "bb_single_gs_multistep"):
        assert not [n for n in recipes if n.startswith(heir + "-")], heir


def test_svhn_eps12_is_the_unif3_recipe_not_a_k2_sweep_point(paper):
    _, recipes, _ = paper
    # experiments.sh, PRN18 SVHN: eps 12 runs with --unif 3, so it is its own recipe.
    assert "nfgsm_svhn-eps12" not in recipes
    r = recipes["nfgsm_svhn_eps12"]
    assert r["method_args"]["k"] == 3 and r["threat"]["eps"] == "12/255"


# pdejorge/N-FGSM experiments.sh: {(dataset, arch): {eps: (unif, alpha)}} in /255 units.
def _grid(eps, unif=2, alpha=None):
    return {e: (unif, e if alpha is None else alpha) for e in eps}


EXPERIMENTS_SH = {
    ("cifar10", "prn18"): _grid(range(2, 17, 2)),
    ("cifar100", "prn18"): _grid(range(2, 17, 2)),
    ("svhn", "prn18"): {**_grid(range(2, 11, 2)), 12: (3, 12)},
    ("cifar10", "wrn28-10"): {**_grid(range(2, 15, 2)), 16: (4, 16)},
    ("cifar100", "wrn28-10"): _grid(range(2, 17, 2)),
    ("svhn", "wrn28-10"): {**_grid(range(2, 9, 2)), **_grid([10, 12], alpha=8)},
}


def test_paper_nfgsm_cells_are_exactly_experiments_sh(paper):
    _, _, cells = paper
    got = {}
    for c in cells:
        if c["method"] == "nfgsm" and c["arch"]["name"] in ("prn18", "wrn28-10"):
            eps = round(c["threat"]["eps"] * 255, 6)
            args = c["method_args"]
            got.setdefault((c["dataset"]["name"], c["arch"]["name"]), {})[eps] = (
                args["k"], round(args["alpha_ratio"] * eps, 6))
    assert got == {key: {e: (u, a) for e, (u, a) in grid.items()}
                   for key, grid in EXPERIMENTS_SH.items()}


@pytest.mark.parametrize("name", ["paper", "ablations"])
def test_cifar_and_svhn_train_on_the_full_training_set(name):
    """No official code holds images out (N-FGSM only with --validation-early-stop, which its
    experiments.sh never passes), so every dataset a cell uses has val_size 0."""
    cfg = config(name)
    used = {d for d, *_ in iter_cells(cfg)}
    for d in used:
        assert cfg["datasets"][d]["val_size"] == 0, d


def test_the_1k_holdout_stays_available_as_a_dataset_option():
    datasets = config("paper")["datasets"]
    for source in ("cifar10", "cifar100", "svhn"):
        assert datasets[f"{source}-holdout1k"] == {"source": source, "val_size": 1000}


def test_svhn_baselines_ramp_eps_over_5_epochs_and_cifar_ones_do_not(paper):
    """N-FGSM train.py's SVHN branch ramps eps for every run of the script (FGSM-RS included);
    PGD follows GradAlign's SVHN code.  BB's code has no ramp, so its framework's baselines
    (nfgsm_bb_train, pgd10_bb) have none."""
    _, _, cells = paper
    seen = set()
    for c in cells:
        if c["method"] not in ("nfgsm", "fgsm_rs", "pgd_at"):
            continue
        ramp = c["method_args"].get("eps_ramp_epochs", 0)
        own_framework = c["arch"]["name"] in ("prn18", "wrn28-10")
        expected = 5 if (c["dataset"]["source"] == "svhn" and own_framework) else 0
        assert ramp == expected, (c["dataset"]["name"], c["arch"]["name"], c["recipe"])
        if expected:
            seen.add(c["method"])
    assert seen == {"nfgsm", "fgsm_rs", "pgd_at"}


def test_svhn_fgsm_rs_is_nfgsm_train_py_with_clip_1(paper):
    _, recipes, _ = paper
    r = recipes["fgsm_rs_svhn"]
    assert r["train"]["epochs"] == 30 and r["train"]["optimizer"]["lr"] == 0.05
    assert r["train"]["schedule"]["peak_at"] == 0.4 and r["augmentation"] == "crop"


def test_bb_has_its_code_default_multistep_schedule_beside_the_cyclic_one(paper):
    cfg, recipes, _ = paper
    r = recipes["bb_single_gs_multistep"]
    assert r["train"]["schedule"]["name"] == "multistep"
    assert r["train"]["schedule"]["milestones"] == [28, 56]
    assert r["train"]["schedule"]["gamma"] == 0.1 and r["train"]["optimizer"]["lr"] == 0.01
    assert recipes["bb_single_gs"]["train"]["schedule"]["name"] == "cyclic"
    bb_cells = {r for _, _, m, r, _ in iter_cells(cfg) if m == "bb"}
    assert {"bb_single_gs", "bb_single_gs_multistep"} <= bb_cells


# ----------------------------------------------------------------------------- published links
def _published_rows(cfg):
    rows = []
    for rel in cfg.get("published", []):
        with open(REPO_ROOT / rel, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def _links(recipe):
    pub = recipe.get("published") or {}
    assert set(pub) <= {"rows", "different_protocol"}, set(pub)
    for link in pub.get("rows", []):
        yield link, None
    for entry in pub.get("different_protocol", []):
        assert set(entry) == {"match", "why"} and entry["why"].strip(), entry
        yield entry["match"], entry["why"]


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_published_link_names_existing_csv_rows(name):
    """Keys are CSV columns (never ``eps``: the cell's eps is matched by the tables, and a
    fraction in a link would be resolved to a float that no CSV cell equals), and each link
    matches at least one row."""
    cfg = config(name)
    rows = _published_rows(cfg)
    recipes = load_recipes(cfg)
    for recipe in {r for *_, r, _ in iter_cells(cfg)}:
        for link, _ in _links(recipes[recipe]):
            assert "eps" not in link, recipe
            assert rows and set(link) <= set(rows[0]), (recipe, link)
            assert any(all(str(row[k]) == str(v) for k, v in link.items()) for row in rows), \
                (recipe, link)


def test_links_of_another_protocol_are_marked(paper):
    _, recipes, _ = paper
    def rows(name):
        return (recipes[name].get("published") or {}).get("rows", [])
    # locuslab's PGD row is the long-schedule PGD-7 run: not the 30-epoch PGD-10 recipe's.
    assert rows("pgd10_cifar") == []
    dp = recipes["pgd10_cifar"]["published"]["different_protocol"]
    assert dp[0]["match"]["method"] == "PGD AT (baseline)"
    # The Selective-AT CIFAR numbers come from the released (BatchNorm-bug) scripts.
    for fixed in ("sat_margin_cifar", "sat_random_cifar", "sat_full_cifar"):
        assert rows(fixed) == [] and rows(fixed + "_bnbug")
    # Ablation sweeps with another rho or warm-up carry no published row.
    for name in recipes:
        if name.startswith(("sat_margin_cifar_ablate", "sat_margin_mnist_ablate")):
            assert rows(name) == [], name
    # BB's SVHN gain is a single-step BB claim: not linked to multi-step BB or the baselines.
    for name in ("bb_multi_gs", "bb_multi_cp", "nfgsm_bb_eval", "nfgsm_bb_train", "pgd10_bb"):
        assert rows(name) == [], name
