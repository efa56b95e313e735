"""The workflow config checked before any job starts: one :class:`~methods.config.ConfigError`
naming the field, the value and what is allowed (``recipes.bb_gs_mnist.method_args.m: got 0;
allowed: an integer >= 1``).

The Snakefile calls :func:`check_config` on the config as read, before ``validate`` fills the
schema's defaults and before any rule exists, so a wrong config writes nothing under
``results_dir``.  In order (the first problem found is the one reported):

1. the config schema (``workflow/schemas/config.schema.yaml``), its errors rephrased with the
   field, the value and the allowed values (unknown keys list the known ones);
2. names that become directories, file names or shell words: ``run_name``, dataset, arch and
   recipe names (:data:`NAME_TEXT`; a dataset may not take the name of a directory the
   workflow writes under results_dir), ``results_dir`` / ``data_dir`` (no spaces or shell
   characters: the rules' shell commands use them unquoted);
3. datasets: the cross-field rules of :func:`methods.data.spec.parse_spec` that depend on the
   source (mirrored in the ``*_SOURCES`` tuples, which the tests pin to the registry);
4. archs: a registered model and only its declared keyword arguments, of their annotated types;
5. recipes, each as a cell uses it (``extends``, ``sweep`` and ``recipe_overrides`` applied):
   ``$defs/recipe`` of the schema, ``threat.eps`` > 0, a registered method, and ``method_args``
   against that method's declared parameters (names, annotated types, :data:`ARG_RULES`); a key
   declared by another method is reported as a recipe whose method does not match its args;
6. cells: every dataset, arch and recipe named exists;
7. evaluation: the attack and defence specs of the config, of every recipe and of the config's
   ``recipe_evaluation`` (each a known recipe)
   (:mod:`methods.attack_specs`, :mod:`methods.defenses.specs`), then per recipe a cell uses the
   merged block: unique labels, AutoAttack's ``attacks`` with version ``custom`` only, and
   ``compare_pgd`` under AutoAttack's threat.

No torch (``tests/test_config_validation.py`` checks it): the methods' and models' declared
parameters come from :mod:`methods.declared`, which reads them from the source, so building the
DAG never imports torch.
"""
from __future__ import annotations

import ast
import difflib
import functools
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from .attack_specs import (AttackSpecError, attack_threat, check_attack_specs,
                           normalize_attack_spec)
from .config import (REPO_ROOT, SCHEMA_DIR, ConfigError, deep_merge, load_raw_recipes,
                     load_recipes, number, resolve_evaluation)
from .declared import (Check, annotation_check, as_float, is_number, method_parameters,
                       model_parameters)
from .defenses.specs import (DefenseSpecError, check_defense_attacks, check_defense_specs,
                             normalize_defense_autoattack)

SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"
_SCHEMA_URI = "urn:advrepro:config.schema"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
NAME_TEXT = ("letters, digits, '_', '.' and '-', not starting with '.' or '-' (it becomes a "
             "directory or file name)")
PATH_CHARS = re.compile(r"[\s$`'\"\\;&|<>*?()\[\]{}!#]")
#: Directories the workflow writes directly under results_dir; a dataset of that name would mix.
RESERVED_DATASET_NAMES = ("bench", "data", "logs", "paper_tables", "plots", "report", "tables")
#: Sources by kind, as methods.data registers them (spurious_colour, resizable, official_val).
COLOURED_SOURCES = ("cmnist", "cmnist5k")
RESIZING_SOURCES = ("celeba", "waterbirds")
OFFICIAL_VAL_SOURCES = ("celeba", "waterbirds")


def _int(lo: int) -> Check:
    return (lambda v: v >= lo, f"an integer >= {lo}")


def _num(lo: float, low_open: bool, hi: Optional[float] = None) -> Check:
    text = f"a number {'>' if low_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi else "")
    return (lambda v: (v > lo if low_open else v >= lo) and (hi is None or v <= hi), text)


POSITIVE, NON_NEGATIVE, UNIT, INT_GE0, INT_GE1 = (_num(0, True), _num(0, False), _num(0, True, 1),
                                                   _int(0), _int(1))
#: Ranges of method arguments (after the annotated type), checked where the value is not null.
#: Mostly the constructors' own checks, known before any job; ``steps`` >= 1 and step sizes > 0
#: are the config's rule where a constructor would accept them (selective and iat keep their
#: constructors' steps >= 0: no attack).
ARG_RULES: Dict[str, Dict[str, Check]] = {
    "bb": {"m": INT_GE1, "steps": INT_GE1, "alpha": POSITIVE, "radius_ratio": NON_NEGATIVE,
           "clean_warmup_epochs": INT_GE0},
    "pgd_at": {"steps": INT_GE1, "alpha": POSITIVE, "eps_ramp_epochs": NON_NEGATIVE},
    "nfgsm": {"k": NON_NEGATIVE, "alpha_ratio": POSITIVE, "eps_ramp_epochs": NON_NEGATIVE},
    "fgsm_rs": {"alpha_ratio": POSITIVE, "eps_ramp_epochs": NON_NEGATIVE},
    "selective": {"rho": UNIT, "steps": INT_GE0, "alpha": POSITIVE, "lambda_clean": NON_NEGATIVE,
                  "warmup_epochs": INT_GE0, "eval_every_epochs": INT_GE1},
    "iat": {"steps": INT_GE0, "alpha": POSITIVE, "mixup_alpha": NON_NEGATIVE,
            "adv_ratio": _num(0, False, 1)},
    "layerwise_at": {"steps": INT_GE1, "alpha": POSITIVE, "deep_eps_scale": NON_NEGATIVE},
    "batchout": {"k": UNIT},
    "mixup": {"alpha": NON_NEGATIVE},
    "manifold_mixup": {"alpha": NON_NEGATIVE},
    "isda": {"lambda0": NON_NEGATIVE},
    "iada": {"alpha": NON_NEGATIVE},
    "meta_iada": {"alpha": NON_NEGATIVE, "hidden": INT_GE1, "layers": INT_GE1,
                  "meta_interval": INT_GE1, "meta_batch_size": _int(2)},
}


# ----------------------------------------------------------------------------- messages

def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def fail(field: str, value: Any, allowed: str, problem: Optional[str] = None,
         note: str = "", hint: str = "") -> ConfigError:
    """``<field>: got <value>; allowed: <allowed>`` (or ``<field>: <problem> <value>; ...``)."""
    head = f"{problem} {_show(value)}" if problem else f"got {_show(value)}"
    return ConfigError(f"{field}: {head}{hint}; allowed: {allowed}{note}")


def _listing(names: Iterable[Any]) -> str:
    return ", ".join(str(n) for n in sorted(names, key=str)) or "none"


# ----------------------------------------------------------------------------- the schema

@functools.lru_cache(maxsize=None)
def _validators() -> Tuple[Draft202012Validator, Draft202012Validator]:
    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    registry = Registry().with_resource(_SCHEMA_URI, Resource.from_contents(schema))
    return (Draft202012Validator(schema),
            Draft202012Validator({"$ref": f"{_SCHEMA_URI}#/$defs/recipe"}, registry=registry))


_TYPE_TEXT = {"integer": "an integer", "number": "a number", "string": "a string",
              "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null"}
_PATTERN_TEXT = {"^[A-Za-z0-9_][A-Za-z0-9_.-]*$": NAME_TEXT,
                 "^(auto|cpu|cuda(:[0-9]+)?)$": "'auto', 'cpu', 'cuda' or 'cuda:N'"}


def _allowed(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return f"one of {schema['enum']}"
    types = schema.get("type") or []
    text = " or ".join(_TYPE_TEXT[t] for t in ([types] if isinstance(types, str) else types))
    bounds = [f"{op} {schema[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                     ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in schema]
    text = " ".join(filter(None, [text or "a value", " and ".join(bounds)]))
    if "pattern" in schema:
        text += f" of {_PATTERN_TEXT.get(schema['pattern'], 'the pattern ' + schema['pattern'])}"
    if schema.get("minLength"):
        text += ", not empty"
    return text


def _schema_error(error, prefix: str, note: str = "") -> ConfigError:
    path = prefix
    for key in error.absolute_path:
        path = _join(path, key)
    kw, value, schema = error.validator, error.instance, error.schema
    if kw == "additionalProperties" and isinstance(value, Mapping):
        known = schema.get("properties", {})
        key = sorted((k for k in value if k not in known), key=str)[0]
        return fail(_join(path, key), value[key], f"the keys {_listing(known)}",
                    "unknown key, with value", note)
    if kw == "required":
        missing = [k for k in error.validator_value if k not in value][0]
        optional = set(schema.get("properties", {})) - set(error.validator_value)
        return fail(path or "config", missing, f"a mapping with the keys {error.validator_value}"
                    + (f", optionally {_listing(optional)}" if optional else ""),
                    "missing the required key", note)
    if kw == "minItems":
        return fail(path, value, f"a list of at least {error.validator_value} item(s)", note=note)
    if kw == "minProperties":
        return fail(path, value, f"a mapping of at least {error.validator_value} entry(ies)",
                    note=note)
    if kw in ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
              "pattern", "minLength"):
        return fail(path or "config", value, _allowed(schema), note=note)
    return ConfigError(f"{path or 'config'}: {error.message}{note}")


def _check_schema(validator: Draft202012Validator, instance: Any, prefix: str = "",
                  note: str = "") -> None:
    errors = sorted(validator.iter_errors(instance),
                    key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path]))
    if errors:
        raise _schema_error(errors[0], prefix, note)


# ----------------------------------------------------------------------------- arguments

def check_arguments(field: str, args: Mapping[str, Any], declared: Mapping[str, Optional[ast.expr]],
                    rules: Mapping[str, Check], owner: str, note: str = "",
                    elsewhere: Mapping[str, Iterable[str]] = {},
                    fixed: Tuple[str, ...] = ()) -> None:
    """``args`` against ``declared`` parameters: names, annotated types, then ``rules``
    (``fixed``: keys checked elsewhere, listed as allowed)."""
    for key, value in args.items():
        where = _join(field, key)
        if key in fixed:
            continue
        if key not in declared:
            others = sorted(m for m, params in elsewhere.items() if key in params)
            hint = (f"; {key!r} is a parameter of {_listing(others)}: does the recipe's method "
                    "match its method_args?" if others else "")
            raise fail(where, value, f"the keys of {owner}: {_listing(fixed + tuple(declared))}",
                       f"unknown key for {owner}, with value", hint + note)
        check = annotation_check(declared[key])
        if check is not None and not check[0](value):
            raise fail(where, value, check[1], note=note)
        rule = rules.get(key)
        if rule is not None and value is not None and not (
                is_number(value) and rule[0](as_float(value))):
            raise fail(where, value, rule[1], note=note)


# ----------------------------------------------------------------------------- the checks

def check_config(config: Mapping[str, Any], root: Path = REPO_ROOT) -> Dict[str, Dict[str, Any]]:
    """Raise one :class:`ConfigError` for the first problem in ``config`` (see the module
    docstring); returns the resolved recipes (:func:`methods.config.load_recipes`)."""
    _check_schema(_validators()[0], config)
    _check_names(config)
    for name, spec in config["datasets"].items():
        _check_dataset(f"datasets.{name}", spec)
    for name, arch in config["archs"].items():
        _check_arch(f"archs.{name}", arch)
    recipes = _check_recipes(config, root)
    used = _check_cells(config, recipes)
    base = config.get("evaluation") or {}
    check_evaluation(base, "evaluation")
    for name, block in (config.get("recipe_evaluation") or {}).items():
        if name not in recipes:
            raise fail(f"recipe_evaluation.{name}", name, f"one of the recipes "
                       f"{_listing(recipes)}", "unknown recipe")
        if not isinstance(block, Mapping):
            raise fail(f"recipe_evaluation.{name}", block, "an evaluation block (a mapping)")
        if "checkpoints" in block:
            raise fail(f"recipe_evaluation.{name}.checkpoints", block["checkpoints"],
                       "absent: the config's evaluation.checkpoints applies to every cell")
        check_evaluation(block, f"recipe_evaluation.{name}", whole=False)
    for name in sorted(used):
        spec = resolve_evaluation(config, name, recipes)   # the merged block: clashing labels
        note = f" (recipe {name!r}'s evaluation merged over the config's)"
        _check_autoattack(spec, "evaluation", note)
        compare = (spec.get("autoattack") or {}).get("compare_pgd")
        threat = spec.get("threat") or recipes[name]["threat"]
        threat = {"norm": threat["norm"], "eps": number(threat["eps"], "threat.eps")}
        if compare and attack_threat(compare, threat) != attack_threat({}, threat):
            raise fail("evaluation.autoattack.compare_pgd",
                       {k: compare[k] for k in ("norm", "eps")},
                       f"unset or AutoAttack's threat {attack_threat({}, threat)} (the same "
                       "images under the same threat)", note=note)
    return recipes


def _check_name(field: str, name: Any, reserved: Tuple[str, ...] = ()) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise fail(field, name, NAME_TEXT, "bad name")
    if name in reserved:
        raise fail(field, name, f"any name but {list(reserved)} (directories of results_dir)",
                   "reserved name")


def _check_names(config: Mapping[str, Any]) -> None:
    if "run_name" in config:
        _check_name("run_name", config["run_name"])
    for key in ("results_dir", "data_dir"):
        if key in config and PATH_CHARS.search(config[key]):
            raise fail(key, config[key], "a path without spaces or shell characters "
                       "($ ` ' \" \\ ; & | < > * ? ( ) [ ] { } ! #): the rules' commands use it")
    for kind, reserved in (("datasets", RESERVED_DATASET_NAMES), ("archs", ())):
        for name in config[kind]:
            _check_name(kind, name, reserved)


def _check_dataset(field: str, spec: Mapping[str, Any]) -> None:
    """parse_spec's rules that depend on the source (the schema has the rest)."""
    source = spec["source"]
    on = f" (source {source!r})"
    if ("spurious" in spec) != (source in COLOURED_SOURCES):
        raise fail(_join(field, "spurious"), spec.get("spurious"), f"a mapping like "
                   f"{{correlation: 0.9}} for the sources {COLOURED_SOURCES}, absent otherwise",
                   note=on)
    if "image_size" in spec and source not in RESIZING_SOURCES:
        raise fail(_join(field, "image_size"), spec["image_size"],
                   f"absent: it applies to the sources {RESIZING_SOURCES} only", note=on)
    noise = spec.get("label_noise") or {}
    if "val_size" in spec:
        why = ("its official validation split is the val set" if source in OFFICIAL_VAL_SOURCES
               else "long_tail's meta set is the val set" if "long_tail" in spec
               else "label_noise.meta_per_class's meta set is the val set"
               if noise.get("meta_per_class") is not None else None)
        if why:
            raise fail(_join(field, "val_size"), spec["val_size"], f"absent: {why}", note=on)
    if "long_tail" in spec and noise.get("meta_per_class") is not None:
        raise fail(_join(field, "label_noise.meta_per_class"), noise["meta_per_class"],
                   "absent with long_tail (long_tail.meta_per_class sets the meta set)")
    if noise.get("include_true_class") and noise.get("kind") != "symmetric":
        raise fail(_join(field, "label_noise.include_true_class"), True,
                   "false unless kind is 'symmetric'", note=f" (kind {noise.get('kind')!r})")


def _check_arch(field: str, arch: Mapping[str, Any]) -> None:
    models = model_parameters()
    model = arch["model"]
    if model not in models:
        raise fail(_join(field, "model"), model, f"one of the models {_listing(models)}",
                   "unknown model")
    check_arguments(field, arch, models[model], {}, f"model {model!r}", fixed=("model", "width"))


def _origin_note(name: str, origin: Mapping[str, str]) -> str:
    base = name if name in origin else max((r for r in origin if name.startswith(r + "-")),
                                           key=len, default=None)
    where = origin.get(base, "?")
    sweep = "" if base == name else f", a sweep variant of {base!r}"
    return f" (recipe {name!r} from {where}{sweep}, after extends and recipe_overrides)"


def _check_recipes(config: Mapping[str, Any], root: Path) -> Dict[str, Dict[str, Any]]:
    if "recipe_files" in config:
        for i, rel in enumerate(config["recipe_files"]):
            path = Path(rel) if Path(rel).is_absolute() else root / rel
            if not path.is_file():
                raise fail(f"recipe_files[{i}]", rel, f"a YAML file (relative to {root})",
                           "no such file")
    raw, origin = load_raw_recipes(config, root)
    for name, body in raw.items():
        note = _origin_note(name, origin)
        if not isinstance(body, Mapping):
            raise fail(f"recipes.{name}", body, "a mapping of recipe fields", note=note)
        if "extends" in body and not isinstance(body["extends"], str):
            raise fail(f"recipes.{name}.extends", body["extends"], "a recipe name", note=note)
        sweep = body.get("sweep") or {}
        if not isinstance(sweep, Mapping):
            raise fail(f"recipes.{name}.sweep", sweep, "a mapping of axes", note=note)
        for axis, spec in sweep.items():
            if not (isinstance(spec, Mapping) and isinstance(spec.get("path"), str)
                    and isinstance(spec.get("values"), Mapping)):
                raise fail(f"recipes.{name}.sweep.{axis}", spec, "{path: <dotted key, e.g. "
                           "method_args.m>, values: {<suffix>: <value>, ...}}", note=note)
    overrides = {k: v for k, v in (config.get("recipe_overrides") or {}).items()
                 if k != "method_args"}
    dummy = {"method": "standard", "threat": {"norm": "linf", "eps": 0.1},
             "train": {"epochs": 1, "batch_size": 1, "optimizer": {"lr": 0.1}}}
    _check_schema(_validators()[1], deep_merge(dummy, overrides), "recipe_overrides")
    recipes = load_recipes(config, root)
    for name, body in recipes.items():
        note = _origin_note(name, origin)
        _check_name("recipes", name)
        check_recipe(f"recipes.{name}", body, note)
    return recipes


def check_recipe(field: str, body: Mapping[str, Any], note: str = "") -> None:
    """One resolved recipe: the schema's ``$defs/recipe``, then values the schema cannot say."""
    _check_schema(_validators()[1], body, field, note)
    for key in ("threat.eps", "train.monitor.alpha"):
        parent, _, leaf = key.rpartition(".")
        block = functools.reduce(lambda d, k: d.get(k) or {}, parent.split("."), body)
        if leaf in block and not (is_number(block[leaf]) and as_float(block[leaf]) > 0):
            raise fail(f"{field}.{key}", block[leaf], "a number > 0 or a fraction like '8/255'",
                       note=note)
    schedule = body["train"].get("schedule") or {}
    if schedule.get("name") == "multistep" and "milestones" not in schedule:
        raise fail(f"{field}.train.schedule", schedule, "with name 'multistep', the key "
                   "milestones (epochs at which the LR is multiplied by gamma)", note=note)
    methods = method_parameters()
    method = body["method"]
    if method not in methods:
        raise fail(f"{field}.method", method, f"one of the methods {_listing(methods)}",
                   "unknown method", note)
    check_arguments(f"{field}.method_args", body.get("method_args") or {}, methods[method],
                    ARG_RULES.get(method, {}), f"method {method!r}", note, elsewhere=methods)
    if "evaluation" in body:
        if "checkpoints" in body["evaluation"]:
            raise fail(f"{field}.evaluation.checkpoints", body["evaluation"]["checkpoints"],
                       "absent: the config's evaluation.checkpoints applies to every cell",
                       note=note)
        check_evaluation(body["evaluation"], f"{field}.evaluation", note, whole=False)


def _check_cells(config: Mapping[str, Any], recipes: Mapping[str, Any]) -> set:
    used = set()
    for i, group in enumerate(config["cells"]):
        for kind, known in (("datasets", config["datasets"]), ("archs", config["archs"]),
                            ("recipes", recipes)):
            for j, name in enumerate(group[kind]):
                if name not in known:
                    close = difflib.get_close_matches(str(name), [str(k) for k in known], 3)
                    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                    raise fail(f"cells[{i}].{kind}[{j}]", name, f"one of the {kind} defined in "
                               f"the config{' and recipe_files' if kind == 'recipes' else ''}: "
                               f"{_listing(known)}", f"unknown {kind[:-1]}", hint=hint)
        used.update(group["recipes"])
    return used


_SPEC_MESSAGE = re.compile(r"(?P<field>[\w.\[\]]+): (?:must be|expected) (?P<allowed>.+), "
                           r"got (?P<value>.+)", re.S)


def _rephrase(message: str) -> str:
    """An attack / defence spec error in this module's words (``got ...; allowed: ...``)."""
    m = _SPEC_MESSAGE.fullmatch(message)
    if m:
        return f"{m['field']}: got {m['value']}; allowed: {m['allowed']}"
    return message.replace("; known: ", "; allowed: ")


def check_evaluation(block: Mapping[str, Any], field: str, note: str = "",
                     whole: bool = True) -> None:
    """An evaluation block on its own; ``whole=False`` for a recipe's, which is merged over the
    config's before the cross-field checks (:func:`check_config`)."""
    try:
        check_attack_specs(block.get("attacks"), f"{field}.attacks")
        aa = block.get("autoattack") or {}
        if aa.get("compare_pgd"):
            normalize_attack_spec(aa["compare_pgd"], f"{field}.autoattack.compare_pgd")
        for key, check in (("defenses", check_defense_specs),
                           ("defense_attacks", check_defense_attacks),
                           ("defense_autoattack", normalize_defense_autoattack)):
            if key in block:
                check(block[key], f"{field}.{key}")
    except (AttackSpecError, DefenseSpecError) as e:
        raise ConfigError(f"{_rephrase(str(e))}{note}") from None
    if whole:
        _check_autoattack(block, field, note)
    if "threat" in block and not (is_number(block["threat"]["eps"])
                                  and as_float(block["threat"]["eps"]) > 0):
        raise fail(f"{field}.threat.eps", block["threat"]["eps"], "a number > 0", note=note)


def _check_autoattack(block: Mapping[str, Any], field: str, note: str = "") -> None:
    aa = block.get("autoattack") or {}
    version = aa.get("version", "standard")
    if aa.get("enabled", True) and (version == "custom") != ("attacks" in aa):
        raise fail(f"{field}.autoattack.attacks", aa.get("attacks"), "a list of AutoAttack "
                   "attacks with version 'custom', and only then",
                   note=f" (version {version!r}){note}")
