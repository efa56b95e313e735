"""The shipped configs and recipes: every cell resolves and builds its method (and its evaluation),
sweeps belong to the recipe that declares them, the paper matrix follows the official scripts
(N-FGSM experiments.sh, train.py's SVHN branch, BB's schedules) and holds the mixing / BatchOut /
layer-wise / IADA papers' cells, and published links name CSV rows."""
import csv
from pathlib import Path

import pytest

from methods.builders import build_method, build_threat
from methods.config import (REPO_ROOT, iter_cells, load_recipes, load_yaml, recipe_annotations,
                            resolve_cell, resolve_evaluation)
from methods.data.spec import parse_spec
from methods.registry import DATASETS
from methods.tables import load_published, published_for

CONFIG_DIR = REPO_ROOT / "workflow" / "config"
RUN_CONFIGS = ["default", "smoke", "paper", "ablations", "iada_grid"]


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
        parse_spec(dataset, cfg["datasets"][dataset])               # a bad dataset entry raises
    for recipe in {r for *_, r, _ in cells}:
        resolve_evaluation(cfg, recipe, recipes)   # attack / defence specs of the recipe validate


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


def _held_out_by_protocol(spec):
    """A val split the protocol itself defines: the balanced meta set of a long-tail or
    meta-set noisy-label dataset, or a source's official validation split."""
    return (spec.long_tail is not None or spec.meta_per_class is not None
            or getattr(DATASETS.get(spec.source), "official_val", False))


@pytest.mark.parametrize("name", ["paper", "ablations"])
def test_cifar_and_svhn_train_on_the_full_training_set(name):
    """No official code holds images out (N-FGSM only with --validation-early-stop, which its
    experiments.sh never passes), so every dataset a cell uses has val_size 0 -- except where
    the val split IS the protocol's: the meta set of the long-tail / noisy-label entries (10
    clean images per class, Meta-Weight-Net / Meta-CALA) and Waterbirds' / CelebA's official
    validation split."""
    cfg = config(name)
    used = {d for d, *_ in iter_cells(cfg)}
    exempt = set()
    for d in used:
        spec = parse_spec(d, cfg["datasets"][d])
        if _held_out_by_protocol(spec):
            assert "val_size" not in cfg["datasets"][d], d
            exempt.add(d)
        else:
            assert cfg["datasets"][d]["val_size"] == 0, d
    if name == "paper":
        assert {"cifar100-lt100", "cifar10-sym40", "cifar10-flip20", "waterbirds-32"} <= exempt


# ----------------------------------------------------------------------------- the papers of issues 9-10
MIXING = {("cifar10", "prn18-bb"): {"mm_none_cifar", "mm_input_cifar", "mm_manifold_cifar",
                                    "mixup_cifar", "iat_cifar", "iat_manifold_cifar"},
          ("cifar10", "prn18"): {"mixup_mi_cifar", "iat_mi_cifar"},
          ("cifar100", "prn18"): {"mixup_mi_cifar", "iat_mi_cifar"}}
BATCHOUT_CIFAR = {"standard_vgg", "batchout_n_1", "batchout_n_2", "batchout_n_3", "batchout_n_neg2",
                  "batchout_n_neg3", "batchout_alt_1", "batchout_alt_2", "batchout_alt_3",
                  "batchout_alt_neg2", "batchout_alt_neg3", "batchout_alt_2_c",
                  "batchout_alt_2p5_c", "batchout_alt_2_diffclass", "batchout_all_middle_2",
                  "batchout_all_middle_3", "batchout_random_3_neg2", "batchout_random_3_neg2_0",
                  "batchout_all_middle_random_2_neg2_0_c", "batchout_paper_cifar"}
IADA_FAMILY = {"ce_iada_cifar", "mixup_iada_cifar", "isda_iada_cifar", "iada_cifar",
               "iada_classwise_cifar", "meta_iada_cifar"}
IADA_SCENARIOS = [f"{c}-{v}" for c in ("cifar10", "cifar100")
                  for v in ("lt100", "lt50", "lt10", "sym40", "sym60", "flip20", "flip40")]
META_IADA_ABLATIONS = {"meta_iada_cifar_alpha-a01", "meta_iada_cifar_alpha-a025",
                       "meta_iada_cifar_alpha-a075", "meta_iada_cifar_alpha-a1",
                       "meta_iada_cifar_gradient", "meta_iada_cifar_clamp5",
                       "meta_iada_cifar_interval1", "meta_iada_cifar_noramp",
                       "meta_iada_cifar_mwn_lookahead"}


def _by_dataset_arch(cells):
    got = {}
    for c in cells:
        got.setdefault((c["dataset"]["name"], c["arch"]["name"]), set()).add(c["recipe"])
    return got


def test_paper_holds_the_mixing_batchout_layerwise_and_iada_cells(paper):
    cfg, _, cells = paper
    got = _by_dataset_arch(cells)
    for key, recipes in MIXING.items():
        assert recipes <= got[key], key
    for arch in ("vgg19bn", "vgg19bn-tied"):
        assert got[("cifar10", arch)] == BATCHOUT_CIFAR
    assert cfg["archs"]["vgg19bn"] == {"model": "vgg19_bn"}
    assert cfg["archs"]["vgg19bn-tied"] == {"model": "vgg19_bn", "tied": True}
    assert "batchout_paper_mnist" in got[("mnist", "smallcnn")]
    for source in ("cifar10", "cifar100"):
        assert {"layerwise_cifar", "layerwise_pgd_cifar", "standard_cifar",
                "pgd10_cifar"} <= got[(source, "wrn28-10")]
        assert {"isda_wrn_cifar", "ce_wrn_isda_cifar"} <= got[(source, "wrn28-10-bb")]
    assert {"layerwise_mnist_full", "layerwise_pgd_mnist_full",
            "pgd40_mnist_full"} <= got[("mnist", "wrn28-10")]
    for d in IADA_SCENARIOS + ["waterbirds-32", "celeba-32"]:
        expected = IADA_FAMILY | (META_IADA_ABLATIONS if d.endswith("-lt100") else set())
        assert got[(d, "resnet32")] == expected, d
    # The scenario entries: the meta set of 10 per class, the noise kinds and rates.
    ds = cfg["datasets"]
    assert ds["cifar100-lt50"]["long_tail"] == {"imbalance_factor": 50, "meta_per_class": 10}
    assert ds["cifar10-sym60"]["label_noise"] == {"kind": "symmetric", "rate": 0.6,
                                                  "include_true_class": True, "meta_per_class": 10}
    assert ds["cifar100-flip40"]["label_noise"] == {"kind": "flip", "rate": 0.4, "meta_per_class": 10}
    # resnet32 takes 28x28 / 32x32 only, so the group-shift sources are stored at 32x32.
    assert ds["waterbirds-32"] == {"source": "waterbirds", "image_size": 32}
    assert ds["celeba-32"] == {"source": "celeba", "image_size": 32}


def test_mixup_inference_recipes_evaluate_the_mi_defences(paper):
    cfg, recipes, _ = paper
    def labels(recipe):
        ev = resolve_evaluation(cfg, recipe, recipes)
        return [d["name"] for d in ev["defenses"]], ev
    names, ev = labels("mixup_mi_cifar")
    assert names == ["identity", "mi_ol", "mi_combined", "gaussian", "rotation", "xie", "guo"]
    assert len(ev["defense_attacks"]) == 6 and ev["defense_autoattack"]["version"] == "rand"
    names, ev = labels("iat_mi_cifar")
    assert names == ["identity", "mi_ol", "gaussian", "rotation", "xie", "guo"]
    assert ev["defenses"][1]["lam"] == 0.6
    assert "defenses" not in resolve_evaluation(cfg, "mixup_cifar", recipes)


def test_paper_evaluation_has_the_fgsm_eps_grid(paper):
    cfg, recipes, _ = paper
    attacks = resolve_evaluation(cfg, "standard_cifar", recipes)["attacks"]
    linf = sorted(round(a["eps"] * 255) for a in attacks
                  if a["name"] == "fgsm" and a["eps"] is not None and a["norm"] is None)
    assert linf == [1, 2, 3, 4, 5, 6, 7]
    assert any(a["name"] == "fgsm" and a["norm"] == "l2" and a["eps"] == 0.5 for a in attacks)
    assert any(a["name"] == "fgsm" and a["eps"] is None for a in attacks)        # plain FGSM kept
    assert any(a["name"] == "pgd" and a["steps"] == 50 and a["restarts"] == 10 for a in attacks)


def test_the_published_meta_iada_row_sits_beside_cifar100_lt100(paper):
    """The IADA CSV's one row (52.18%, dataset "CIFAR-LT", variant "imbalance 100:1") is set
    beside meta_iada_cifar on cifar100-lt100, and on no other ratio or clean dataset."""
    cfg, recipes, cells = paper
    pub = load_published([REPO_ROOT / p for p in cfg["published"]])
    annotations = recipe_annotations(recipes, [c["recipe"] for c in cells])
    shown = {}
    for c in cells:
        for row in published_for(c, annotations[c["recipe"]], pub):
            if str(row["value"]) == "52.18":
                shown.setdefault(c["recipe"], set()).add(c["dataset"]["name"])
    assert set(shown) == {"meta_iada_cifar"}
    assert "cifar100-lt100" in shown["meta_iada_cifar"]
    assert shown["meta_iada_cifar"] <= {"cifar100-lt100", "cifar10-lt100"}   # CIFAR-10 vs -100 unstated


def test_iada_grid_is_every_scenario_times_the_family():
    cfg = config("iada_grid")
    scenarios = ["mnist5k-lt100", "mnist5k-lt50", "mnist5k-lt10", "mnist5k-sym40",
                 "mnist5k-sym60", "mnist5k-flip20", "mnist5k-flip40", "cmnist5k-90"]
    family = ["standard_mnist", "mixup_mnist", "isda_mnist", "iada_mnist",
              "iada_classwise_mnist", "meta_iada_mnist"]
    cells = list(iter_cells(cfg))
    assert sorted((d, r) for d, _, _, r, _ in cells) == sorted((d, r) for d in scenarios for r in family)
    assert {a for _, a, *_ in cells} == {"smallcnn-w0.5"}
    # The scenarios default.yaml also runs are the same entries (same training identity).
    default = config("default")["datasets"]
    for d in set(default) & set(cfg["datasets"]):
        assert default[d] == cfg["datasets"][d], d
    assert cfg["evaluation"] == config("default")["evaluation"]


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
    columns = set().union(*(row.keys() for row in rows))   # the CSVs' columns differ
    recipes = load_recipes(cfg)
    for recipe in {r for *_, r, _ in iter_cells(cfg)}:
        for link, _ in _links(recipes[recipe]):
            assert "eps" not in link, recipe
            assert rows and set(link) <= columns, (recipe, link)
            assert any(all(str(row.get(k)) == str(v) for k, v in link.items()) for row in rows), \
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


def test_default_is_one_row_per_method_and_the_comparisons_share_its_cells():
    """default.yaml: one MNIST-5k row per registered method in the table (the IADA scenarios add
    CE and Meta-IADA rows on their datasets); BB's other rules and Selective AT's random baseline
    are in mnist5k_comparisons.yaml, with the same training and evaluation identities, so the
    cells both name are the same results."""
    default, comparisons = config("default"), config("mnist5k_comparisons")
    mnist = [r for d, _, _, r, _ in iter_cells(default) if d == "mnist5k"]
    recipes = load_recipes(default)
    methods = [recipes[r]["method"] for r in mnist]
    assert len(methods) == len(set(methods)), "one row per method"
    assert {"bb_cp_mnist", "bb_bg_mnist", "sat_random_mnist"} & set(mnist) == set()
    shared = {(d, a, m, r, s) for d, a, m, r, s in iter_cells(default)} & \
        set(iter_cells(comparisons))
    assert {r for *_, r, _ in shared} == {"bb_gs_mnist", "sat_margin_mnist"}
    for d, a, m, r, s in shared:
        assert (resolve_cell(default, d, a, r, s)["train_hash"]
                == resolve_cell(comparisons, d, a, r, s)["train_hash"]), r
        assert (resolve_evaluation(default, r)["eval_hash"]
                == resolve_evaluation(comparisons, r)["eval_hash"]), r
