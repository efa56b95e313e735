"""Config validation before any job starts (methods.config_checks, issue 13): each wrong config
gets one message naming the field, the value and what is allowed, the shipped configs pass, the
torch-free reading of declared parameters matches the registries, and through Snakemake a wrong
config stops before anything is written under results_dir."""
import copy
import re
import subprocess
import sys

import pytest
import yaml

from methods.config import REPO_ROOT, ConfigError, load_recipes, load_yaml
from methods.config_checks import (ARG_RULES, COLOURED_SOURCES, OFFICIAL_VAL_SOURCES,
                                   RESIZING_SOURCES, SCHEMA_PATH, check_config, check_recipe)
from methods.declared import annotation_check, method_parameters, model_parameters
from tests.test_workflow_e2e import snakemake

CONFIG_DIR = REPO_ROOT / "workflow" / "config"
WORKFLOW_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if "cells" in load_yaml(p))
SMOKE = load_yaml(CONFIG_DIR / "smoke.yaml")


@pytest.mark.parametrize("name", WORKFLOW_CONFIGS)
def test_every_shipped_workflow_config_validates(name):
    recipes = check_config(load_yaml(CONFIG_DIR / name))
    assert recipes


def test_the_shipped_configs_are_the_known_ones():
    assert {"default.yaml", "smoke.yaml", "paper.yaml", "ablations.yaml",
            "iada_grid.yaml"} <= set(WORKFLOW_CONFIGS)


def test_bench_only_recipes_validate():
    bench = load_yaml(CONFIG_DIR / "bench.yaml")
    base = load_yaml(REPO_ROOT / bench["base_config"])
    recipes = load_recipes({**base, "recipes": bench["recipes"]})
    for name in bench["recipes"]:
        check_recipe(f"recipes.{name}", recipes[name])


# ----------------------------------------------------------------------------- wrong configs

def put(path, value):
    """A change to SMOKE: set ``path`` (dotted, ``[i]`` for list items) to ``value``."""
    def change(config):
        keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        *parents, last = keys
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return change


DELETE = object()


def entry(kind, name, spec):
    """Add ``name: spec`` to ``config[kind]`` (names may hold dots)."""
    def change(config):
        config.setdefault(kind, {})[name] = spec
    return change


def update(kind, name, **values):
    def change(config):
        config[kind][name].update(values)
    return change


def recipe(name, **body):
    return entry("recipes", name, body)


def combine(*changes):
    def change(config):
        for c in changes:
            c(config)
    return change


def with_dataset(name, spec):
    return combine(entry("datasets", name, spec), put("cells[0].datasets", [name]))


def with_arch(name, spec):
    return combine(entry("archs", name, spec), put("cells[0].archs", [name]))


def with_recipe(name, **body):
    return combine(recipe(name, **body), put("cells[0].recipes", [name]))


# (id, change to the smoke config, field named, value named, fragment of what is allowed)
CASES = [
    # top level: unknown keys, types, enums, ranges
    ("top-unknown-key", put("bogus", 1), "bogus", 1, "results_dir"),
    ("threads-zero", put("threads", 0), "threads", 0, "an integer >= 1"),
    ("threads-type", put("threads", "two"), "threads", "two", "an integer"),
    ("meter-unknown", put("meter", "gpu"), "meter", "gpu", "'nvml'"),
    ("meter-yaml-null", put("meter", None), "meter", None, "'null'"),
    ("device", put("device", "tpu"), "device", "tpu", "'cuda:N'"),
    ("amp", put("amp", "fp8"), "amp", "fp8", "'bf16'"),
    ("download-type", put("download", "yes"), "download", "yes", "true or false"),
    # names that become paths or shell words
    ("run-name-space", put("run_name", "my run"), "run_name", "my run", "letters, digits"),
    ("run-name-slash", put("run_name", "a/b"), "run_name", "a/b", "letters, digits"),
    ("run-name-dot", put("run_name", ".hidden"), "run_name", ".hidden", "not starting with '.'"),
    ("run-name-shell", put("run_name", "x;rm"), "run_name", "x;rm", "letters, digits"),
    ("results-dir-shell", put("results_dir", "res$HOME"), "results_dir", "res$HOME",
     "without spaces or shell characters"),
    ("data-dir-space", put("data_dir", "my data"), "data_dir", "my data", "without spaces"),
    ("dataset-name-space", with_dataset("mnist 5k", {"source": "mnist5k"}), "datasets",
     "mnist 5k", "letters, digits"),
    ("dataset-name-reserved", with_dataset("tables", {"source": "mnist5k"}), "datasets", "tables",
     "any name but"),
    ("arch-name-slash", with_arch("small/cnn", {"model": "smallcnn"}), "archs", "small/cnn",
     "letters, digits"),
    ("arch-name-dotdot", with_arch("..", {"model": "smallcnn"}), "archs", "..", "letters"),
    ("recipe-name-space", with_recipe("my recipe", extends="nfgsm_mnist"), "recipes",
     "my recipe", "letters, digits"),
    ("recipe-name-shell", with_recipe("a|b", extends="nfgsm_mnist"), "recipes", "a|b", "letters"),
    # datasets
    ("dataset-unknown-key", put("datasets.mnist5k.val_sizee", 100), "datasets.mnist5k.val_sizee",
     100, "val_size"),
    ("dataset-source", with_dataset("inet", {"source": "imagenet"}), "datasets.inet.source",
     "imagenet", "'cifar10'"),
    ("dataset-val-size", put("datasets.mnist5k.val_size", -1), "datasets.mnist5k.val_size", -1,
     ">= 0"),
    ("dataset-noise-rate", with_dataset("n", {"source": "mnist5k", "label_noise": {
        "kind": "flip", "rate": 1.0}}), "datasets.n.label_noise.rate", 1.0, "< 1"),
    ("dataset-spurious-missing", with_dataset("cm", {"source": "cmnist5k"}),
     "datasets.cm.spurious", None, "correlation"),
    ("dataset-lt-val-size", with_dataset("lt", {"source": "mnist5k", "val_size": 10, "long_tail": {
        "imbalance_factor": 10}}), "datasets.lt.val_size", 10, "meta set"),
    # archs
    ("arch-unknown-key", update("archs", "smallcnn-w0.125", depth=28),
     "archs.smallcnn-w0.125.depth", 28, "model, width"),
    ("arch-unknown-model", with_arch("r50", {"model": "resnet50"}), "archs.r50.model",
     "resnet50", "preactresnet18"),
    ("arch-width", update("archs", "smallcnn-w0.125", width=0), "archs.smallcnn-w0.125.width", 0,
     "> 0"),
    ("arch-arg-type", with_arch("w", {"model": "wrn", "depth": "28"}), "archs.w.depth", "28",
     "an integer"),
    # cells
    ("cell-unknown-recipe", put("cells[0].recipes[1]", "nfgsm_mnsit"), "cells[0].recipes[1]",
     "nfgsm_mnsit", "bb_gs_mnist"),
    ("cell-unknown-dataset", put("cells[0].datasets[0]", "cifar10"), "cells[0].datasets[0]",
     "cifar10", "mnist5k"),
    ("cell-unknown-arch", put("cells[0].archs[0]", "prn18"), "cells[0].archs[0]", "prn18",
     "smallcnn-w0.125"),
    ("cell-seed", put("cells[0].seeds[0]", -1), "cells[0].seeds[0]", -1, ">= 0"),
    ("cell-unknown-key", put("cells[0].recipe", ["x"]), "cells[0].recipe", ["x"], "recipes"),
    ("cell-missing-key", put("cells[0].seeds", DELETE), "cells[0]", "seeds", "'recipes'"),
    ("cells-empty", put("cells", []), "cells", [], "at least 1"),
    # recipes: method and method_args
    ("bb-m-zero", recipe("bb_gs_mnist", extends="nfgsm_mnist", method="bb",
                         method_args={"m": 0}), "recipes.bb_gs_mnist.method_args.m", 0,
     "an integer >= 1"),
    ("bb-m-type", recipe("bb_gs_mnist", extends="nfgsm_mnist", method="bb",
                         method_args={"m": "5"}), "recipes.bb_gs_mnist.method_args.m", "5",
     "an integer"),
    ("rho-above-one", with_recipe("s", extends="sat_margin_mnist", method_args={"rho": 1.5}),
     "recipes.s.method_args.rho", 1.5, "> 0 and <= 1"),
    ("rho-zero", with_recipe("s", extends="sat_margin_mnist", method_args={"rho": 0}),
     "recipes.s.method_args.rho", 0, "> 0 and <= 1"),
    ("pgd-steps-zero", with_recipe("p", extends="pgd40_mnist", method_args={"steps": 0}),
     "recipes.p.method_args.steps", 0, "an integer >= 1"),
    ("bb-steps-zero", with_recipe("b", extends="bb_gs_mnist", method_args={"steps": 0}),
     "recipes.b.method_args.steps", 0, "an integer >= 1"),
    ("method-unknown", with_recipe("u", extends="nfgsm_mnist", method="nfgsm2"),
     "recipes.u.method", "nfgsm2", "pgd_at"),
    ("method-args-unknown", with_recipe("u", extends="pgd40_mnist", method_args={"stepz": 3}),
     "recipes.u.method_args.stepz", 3, "steps"),
    ("method-args-of-another-method", with_recipe("u", extends="bb_gs_mnist",
                                                  method_args={"k": 2}),
     "recipes.u.method_args.k", 2, "nfgsm"),
    ("method-switched-by-sweep", with_recipe("sw", extends="nfgsm_mnist", sweep={
        "meth": {"path": "method", "values": {"pgd": "pgd_at"}}}), "recipes.sw-pgd.method_args.k",
     2, "does the recipe's method match"),
    ("method-args-from-overrides", put("recipe_overrides.method_args", {"m": 3}),
     "method_args.m", 3, "does the recipe's method match"),
    ("method-args-float-type", with_recipe("f", extends="nfgsm_mnist",
                                           method_args={"alpha_ratio": "fast"}),
     "recipes.f.method_args.alpha_ratio", "fast", "a number"),
    ("sweep-value-out-of-range", with_recipe("bs", extends="bb_gs_mnist", sweep={
        "m": {"path": "method_args.m", "values": {"m0": 0}}}), "recipes.bs-m0.method_args.m", 0,
     "an integer >= 1"),
    # recipes: threat, train, other keys
    ("eps-zero", with_recipe("e", extends="nfgsm_mnist", threat={"eps": 0}),
     "recipes.e.threat.eps", 0, "> 0"),
    ("eps-negative-fraction", with_recipe("e", extends="nfgsm_mnist", threat={"eps": "-8/255"}),
     "recipes.e.threat.eps", "-8/255", "> 0"),
    ("threat-norm", with_recipe("e", extends="nfgsm_mnist", threat={"norm": "linf2"}),
     "recipes.e.threat.norm", "linf2", "'l2'"),
    ("recipe-unknown-key", with_recipe("r", extends="nfgsm_mnist", methodargs={"k": 2}),
     "recipes.r.methodargs", {"k": 2}, "method_args"),
    ("batch-size-zero", with_recipe("r", extends="nfgsm_mnist", train={"batch_size": 0}),
     "recipes.r.train.batch_size", 0, ">= 1"),
    ("overrides-epochs-zero", put("recipe_overrides.train.epochs", 0),
     "recipe_overrides.train.epochs", 0, ">= 1"),
    ("optimizer-unknown-key", with_recipe("r", extends="nfgsm_mnist", train={
        "optimizer": {"momentom": 0.9}}), "recipes.r.train.optimizer.momentom", 0.9, "momentum"),
    ("optimizer-name", with_recipe("r", extends="nfgsm_mnist", train={
        "optimizer": {"name": "rmsprop"}}), "recipes.r.train.optimizer.name", "rmsprop", "'adam'"),
    ("schedule-unknown-key", with_recipe("r", extends="nfgsm_mnist", train={
        "schedule": {"peak": 0.4}}), "recipes.r.train.schedule.peak", 0.4, "peak_at"),
    ("monitor-steps", put("recipe_overrides.train.monitor.steps", 0),
     "recipe_overrides.train.monitor.steps", 0, ">= 1"),
    ("monitor-alpha", with_recipe("r", extends="nfgsm_mnist", train={"monitor": {"alpha": 0}}),
     "recipes.r.train.monitor.alpha", 0, "> 0"),
    ("normalization", with_recipe("r", extends="nfgsm_mnist", normalization="imagenet"),
     "recipes.r.normalization", "imagenet", "'bb_cifar10'"),
    ("overrides-unknown-key", put("recipe_overrides.trian", {"epochs": 1}),
     "recipe_overrides.trian", {"epochs": 1}, "train"),
    ("overrides-nested-unknown-key", put("recipe_overrides.train.epochz", 1),
     "recipe_overrides.train.epochz", 1, "epochs"),
    ("recipe-files-missing", put("recipe_files", ["workflow/config/papers/nope.yaml"]),
     "recipe_files[0]", "workflow/config/papers/nope.yaml", "a YAML file"),
    # evaluation
    ("eval-unknown-key", put("evaluation.atacks", []), "evaluation.atacks", [], "attacks"),
    ("attack-steps-zero", put("evaluation.attacks[1].steps", 0), "evaluation.attacks[1].steps", 0,
     ">= 1"),
    ("attack-eps-negative", put("evaluation.attacks[0].eps", -0.1), "evaluation.attacks[0].eps",
     -0.1, "> 0"),
    ("attack-unknown-name", put("evaluation.attacks[0].name", "cw"), "evaluation.attacks[0].name",
     "cw", "'pgd'"),
    ("attack-unknown-key", put("evaluation.attacks[1].step", 3), "evaluation.attacks[1].step", 3,
     "restarts"),
    ("checkpoint-unknown", put("evaluation.checkpoints", ["last", "final"]),
     "evaluation.checkpoints[1]", "final", "'best'"),
    ("autoattack-unknown-key", put("evaluation.autoattack.nn", 20), "evaluation.autoattack.nn", 20,
     "version"),
    ("autoattack-unknown-attack", put("evaluation.autoattack.attacks", ["apgd-xe"]),
     "evaluation.autoattack.attacks[0]", "apgd-xe", "'apgd-ce'"),
    ("autoattack-attacks-need-custom", put("evaluation.autoattack.version", "standard"),
     "evaluation.autoattack.attacks", ["apgd-ce"], "version 'custom'"),
    ("autoattack-compare-pgd-threat", put("evaluation.autoattack.compare_pgd.eps", 0.3),
     "evaluation.autoattack.compare_pgd", {"norm": None, "eps": 0.3}, "AutoAttack's threat"),
    ("recipe-merged-autoattack", with_recipe("r", extends="nfgsm_mnist", evaluation={
        "autoattack": {"version": "plus"}}), "evaluation.autoattack.attacks", ["apgd-ce"],
     "version 'custom'"),
    ("defense-unknown", put("evaluation.defenses", [{"name": "jpeg"}]),
     "evaluation.defenses[0].name", "jpeg", "'mi_ol'"),
    ("recipe-eval-attack-eps", with_recipe("r", extends="nfgsm_mnist", evaluation={
        "attacks": [{"name": "fgsm", "eps": 0}]}), "recipes.r.evaluation.attacks[0].eps", 0, "> 0"),
    ("recipe-eval-checkpoints", with_recipe("r", extends="nfgsm_mnist", evaluation={
        "checkpoints": ["best"]}), "recipes.r.evaluation.checkpoints", ["best"], "config's"),
    ("recipe-evaluation-unknown-recipe", entry("recipe_evaluation", "nope", {"batch_size": 10}),
     "recipe_evaluation.nope", "nope", "one of the recipes"),
    ("recipe-evaluation-checkpoints", entry("recipe_evaluation", "nfgsm_mnist",
                                            {"checkpoints": ["best"]}),
     "recipe_evaluation.nfgsm_mnist.checkpoints", ["best"], "config's"),
    ("recipe-evaluation-attack", entry("recipe_evaluation", "nfgsm_mnist",
                                       {"attacks": [{"name": "pgdd"}]}),
     "recipe_evaluation.nfgsm_mnist.attacks[0].name", "pgdd", "fgsm"),
]


@pytest.mark.parametrize("change,field,value,allowed", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_wrong_config_gets_one_message_naming_field_value_and_allowed(change, field, value,
                                                                         allowed):
    config = copy.deepcopy(SMOKE)
    change(config)
    with pytest.raises(ConfigError) as raised:
        check_config(config)
    message = str(raised.value)
    assert "\n" not in message
    assert field in message, message
    assert repr(value) in message, message
    assert "allowed: " in message and allowed in message.split("allowed: ", 1)[1], message


def test_there_are_at_least_30_cases_with_distinct_ids():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_the_field_comes_first():
    config = copy.deepcopy(SMOKE)
    recipe("bb_gs_mnist", extends="nfgsm_mnist", method="bb", method_args={"m": 0})(config)
    with pytest.raises(ConfigError, match=r"^recipes\.bb_gs_mnist\.method_args\.m: got 0; "
                                          r"allowed: an integer >= 1 \(recipe 'bb_gs_mnist' "
                                          r"from config\.recipes"):
        check_config(config)


# ----------------------------------------------------------------------------- declared parameters

def test_declared_method_parameters_match_the_registry():
    from methods import algorithms  # noqa: F401  (fills METHODS)
    from methods.registry import METHODS

    declared = method_parameters()
    assert set(declared) == set(METHODS.names())
    for name in METHODS.names():
        params = METHODS.get(name).parameters()
        assert set(declared[name]) == set(params), name
        for key, default in params.items():   # every default passes its own annotation
            check = annotation_check(declared[name][key])
            value = list(default) if isinstance(default, tuple) else default
            assert check is None or check[0](value), (name, key, default, check[1])


def test_arg_rules_name_declared_parameters():
    declared = method_parameters()
    for method, rules in ARG_RULES.items():
        assert set(rules) <= set(declared[method]), method


def test_declared_model_parameters_match_the_registry():
    from methods.models import arch_defaults
    from methods.registry import MODELS

    declared = model_parameters()
    assert set(declared) == set(MODELS.names())
    for name in MODELS.names():
        assert set(declared[name]) == set(arch_defaults(name)), name


def test_schema_enums_and_source_kinds_match_the_code():
    from methods import attacks  # noqa: F401  (fills ATTACKS)
    from methods.autoattack_adapter import ATTACK_NAMES
    from methods.data.transforms import AUGMENTATIONS, NORMALIZATIONS
    from methods.registry import ATTACKS, DATASETS

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    dataset = schema["properties"]["datasets"]["additionalProperties"]["properties"]
    assert set(dataset["source"]["enum"]) == set(DATASETS.names())
    for names, flag in ((COLOURED_SOURCES, "spurious_colour"), (RESIZING_SOURCES, "resizable"),
                        (OFFICIAL_VAL_SOURCES, "official_val")):
        assert set(names) == {n for n in DATASETS.names()
                              if getattr(DATASETS.get(n), flag, False)}, flag
    assert set(schema["$defs"]["autoattack_attack"]["enum"]) == set(ATTACK_NAMES)
    recipe = schema["$defs"]["recipe"]["properties"]
    assert set(recipe["normalization"]["enum"]) == set(NORMALIZATIONS)
    assert set(recipe["augmentation"]["enum"]) == set(AUGMENTATIONS)
    attack = schema["properties"]["evaluation"]["$defs"]["attack"]["properties"]
    assert set(attack["name"]["enum"]) == set(ATTACKS.names())


@pytest.mark.parametrize("files,variable,block", [
    (("training.py", "builders.py"), "tcfg", ("$defs", "recipe", "properties", "train")),
    (("evaluation.py",), "ecfg", ("properties", "evaluation")),
])
def test_every_key_the_code_reads_is_in_the_schema(files, variable, block):
    """The schema refuses unknown keys, so a key the code starts reading must be added there."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for key in block:
        schema = schema[key]
    source = "".join((REPO_ROOT / "methods" / f).read_text() for f in files)
    read = set(re.findall(variable + r"(?:\.get\(|\[)\"(\w+)\"", source)) - {"eval_hash"}
    assert read and read <= set(schema["properties"]), read - set(schema["properties"])


# ----------------------------------------------------------------------------- through Snakemake

@pytest.mark.parametrize("extra,expected", [
    ({"recipes": {"bb_gs_mnist": {"extends": "nfgsm_mnist", "method": "bb",
                                  "method_args": {"m": 0}}}},
     "recipes.bb_gs_mnist.method_args.m: got 0; allowed: an integer >= 1"),
    ({"evaluation": {"checkpoints": ["final"]}},
     "evaluation.checkpoints[0]: got 'final'; allowed: one of ['last', 'best']"),
    ({"run_name": "../escape"}, "run_name: got '../escape'; allowed:"),
], ids=["method-args", "checkpoint", "run-name"])
def test_snakemake_stops_before_writing_anything(tmp_path, extra, expected):
    config = copy.deepcopy(SMOKE)
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    results, data = tmp_path / "results", tmp_path / "data"
    done = snakemake("--cores", "1", "--configfile", str(path), "--config",
                     f"results_dir={results}", f"data_dir={data}")
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr[-3000:]
    assert not results.exists() and not data.exists()


@pytest.mark.parametrize("name", ["methods.config_checks", "methods.declared"])
def test_the_checks_import_neither_torch_nor_the_stages(name):
    from tests.test_layering import imported_modules

    mods = imported_modules(name)
    assert not any(m == "torch" or m.startswith("torch.") for m in mods), mods
    assert not any(m.startswith(("methods.algorithms", "methods.models", "methods.data",
                                 "methods.training", "methods.builders")) for m in mods), mods


def test_checking_a_config_imports_no_torch():
    code = ("import sys; from methods.config import load_yaml, REPO_ROOT; "
            "from methods.config_checks import check_config; "
            "check_config(load_yaml(REPO_ROOT / 'workflow/config/paper.yaml')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
