"""Layered configuration: workflow config -> recipe (with ``extends``) -> overrides -> one cell.

A *cell* is dataset x arch x recipe x seed; the recipe names the method.  This module is
imported by the Snakefile while it builds the DAG, so it must not import torch.

Layering follows timm's train.py: a recipe may ``extends:`` another recipe (deep-merged, child
wins; a ``sweep`` belongs to the recipe that declares it and is not inherited), then the
config's ``recipe_overrides`` are merged into every recipe (the smoke config shrinks epochs this
way).

Two identities, so that evaluating differently never retrains:

* the **training identity** (:func:`resolve_cell`): dataset, arch, method and its args, threat,
  train block, normalisation, augmentation, seed and the runtime settings that change the
  arithmetic (``amp``, ``channels_last``, ``compile``).  Its SHA-256 over canonical JSON is
  ``train_hash``; the train rule's only parameter is this identity, and a training state
  written under another ``train_hash`` is set aside, never resumed.
* the **evaluation identity** (:func:`resolve_evaluation`): the config's ``evaluation`` block
  merged with the recipe's, hashed as ``eval_hash``; it is the evaluate rule's parameter.

Where a job runs (``device``, ``threads``, ``meter``) is in neither, and a recipe's ``paper``,
``notes`` and ``published`` links (:func:`recipe_annotations`) only reach the tables.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import yaml

from .attack_specs import AttackSpecError, check_attack_specs, normalize_attack_spec
from .defenses.specs import (DefenseSpecError, check_defense_attacks, check_defense_specs,
                             normalize_defense_autoattack)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
FRACTION = re.compile(r"\s*-?\d+(\.\d+)?\s*/\s*\d+(\.\d+)?\s*")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the field."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_hash(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_yaml(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_raw_recipes(config: Mapping[str, Any], root: Path = REPO_ROOT
                     ) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The recipes as written (``extends`` and ``sweep`` unresolved) and where each comes from:
    ``recipe_files`` in order, then the config's inline ``recipes`` (which win)."""
    raw: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for rel in config.get("recipe_files", []):
        path = (root / rel) if not Path(rel).is_absolute() else Path(rel)
        for name, body in (load_yaml(path).get("recipes") or {}).items():
            if name in raw:
                raise ConfigError(f"recipe {name!r} defined in both {origin[name]} and {rel}")
            raw[name], origin[name] = body, str(rel)
    for name, body in (config.get("recipes") or {}).items():
        raw[name], origin[name] = body, "config.recipes"
    return raw, origin


def load_recipes(config: Mapping[str, Any], root: Path = REPO_ROOT) -> Dict[str, Dict[str, Any]]:
    """All recipes from ``recipe_files`` plus inline ``recipes``, ``extends`` resolved."""
    raw, _ = load_raw_recipes(config, root)
    overrides = config.get("recipe_overrides") or {}
    recipes: Dict[str, Dict[str, Any]] = {}
    for name in raw:
        body = _resolve_extends(name, raw, ())
        for variant, variant_body in _expand_sweep(name, body).items():
            if variant in recipes:
                raise ConfigError(f"recipe {variant!r} is defined twice (check sweeps)")
            recipes[variant] = deep_merge(variant_body, overrides)
    return recipes


def _expand_sweep(name: str, body: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """A recipe plus one variant per point of its ``sweep`` (the product over axes).

    ``sweep: {m: {path: method_args.m, values: {m2: 2, m3: 3}}}`` adds recipes ``<name>-m2`` and
    ``<name>-m3`` whose ``method_args.m`` is 2 and 3; ablation grids are written this way.
    """
    sweep = body.pop("sweep", None) or {}
    out = {name: body}
    for axis, spec in sweep.items():
        if not isinstance(spec, Mapping) or "path" not in spec or "values" not in spec:
            raise ConfigError(f"recipe {name!r}: sweep.{axis} needs 'path' and 'values'")
        grown = {}
        for base_name, base in out.items():
            for suffix, value in spec["values"].items():
                grown[f"{base_name}-{suffix}"] = _set_path(base, spec["path"], value)
        out.update(grown)
    return out


def _set_path(body: Mapping[str, Any], dotted: str, value: Any) -> Dict[str, Any]:
    keys = dotted.split(".")
    patch: Dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        patch = {key: patch}
    return deep_merge(body, patch)


def number(value: Any, field: str) -> float:
    """A float from a YAML number or a fraction string such as ``"8/255"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            num, _, den = value.replace(" ", "").partition("/")
            return float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{field}: expected a number or a fraction like '8/255', got {value!r}")


def _numbers(obj: Any, field: str) -> Any:
    """Resolve fraction strings ("8/255") in numeric fields anywhere in a recipe."""
    if isinstance(obj, Mapping):
        return {k: _numbers(v, f"{field}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v, f"{field}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str) and FRACTION.fullmatch(obj):
        return number(obj, field)
    return obj


def _resolve_extends(name: str, raw: Mapping[str, Any], chain: Tuple[str, ...]) -> Dict[str, Any]:
    if name in chain:
        raise ConfigError(f"recipe {name!r}: circular 'extends' chain {' -> '.join(chain + (name,))}")
    body = dict(raw[name])
    parent = body.pop("extends", None)
    if parent is None:
        return body
    if parent not in raw:
        raise ConfigError(f"recipe {name!r}: extends unknown recipe {parent!r}")
    inherited = _resolve_extends(parent, raw, chain + (name,))
    inherited.pop("sweep", None)   # a sweep belongs to the recipe that declares it
    if body.get("method", inherited.get("method")) != inherited.get("method"):
        # method_args belong to a method: a child that switches method starts from none.
        inherited.pop("method_args", None)
    return deep_merge(inherited, body)


def iter_cells(config: Mapping[str, Any]) -> Iterator[Tuple[str, str, str, str, int]]:
    """Every (dataset, arch, method, recipe, seed) the config's ``cells`` groups ask for."""
    recipes = load_recipes(config)
    seen = set()
    for i, group in enumerate(config.get("cells", [])):
        for field in ("datasets", "archs", "recipes", "seeds"):
            if field not in group:
                raise ConfigError(f"cells[{i}]: missing field {field!r}")
        for d, a, r, s in itertools.product(group["datasets"], group["archs"],
                                            group["recipes"], group["seeds"]):
            _check_known(config, recipes, d, a, r, where=f"cells[{i}]")
            cell = (d, a, recipes[r]["method"], r, int(s))
            if cell not in seen:
                seen.add(cell)
                yield cell


def _check_known(config, recipes, dataset, arch, recipe, where) -> None:
    for kind, name, known in (("dataset", dataset, config.get("datasets", {})),
                              ("arch", arch, config.get("archs", {})),
                              ("recipe", recipe, recipes)):
        if name not in known:
            raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {sorted(known)}")


#: Runtime settings that change a training step's arithmetic (part of the training identity).
ARITHMETIC_RUNTIME = ("amp", "channels_last", "compile")
#: Runtime settings that say only where and how a job runs (never part of an identity).
EXECUTION_RUNTIME = ("device", "threads", "meter")


def _recipe(config, recipes, dataset, arch, recipe) -> Dict[str, Any]:
    _check_known(config, recipes, dataset, arch, recipe, where="cell")
    body = recipes[recipe]
    for field in ("method", "threat", "train"):
        if field not in body:
            raise ConfigError(f"recipe {recipe!r}: missing field {field!r}")
    return body


def resolve_cell(config: Mapping[str, Any], dataset: str, arch: str, recipe: str,
                 seed: int, recipes: Mapping[str, Dict[str, Any]] | None = None) -> Dict[str, Any]:
    """The training identity of one cell: everything that determines the trained weights.

    ``recipes``: the result of :func:`load_recipes` for ``config``, when the caller has it.
    """
    recipes = load_recipes(config) if recipes is None else recipes
    body = _recipe(config, recipes, dataset, arch, recipe)
    cell = {
        "dataset": {"name": dataset, **config["datasets"][dataset]},
        "arch": {"name": arch, **config["archs"][arch]},
        "recipe": recipe,
        "method": body["method"],
        "method_args": body.get("method_args", {}),
        "threat": body["threat"],
        "normalization": body.get("normalization", "dataset"),
        "augmentation": body.get("augmentation", "default"),
        "train": body["train"],
        "seed": int(seed),
        "runtime": {k: config.get(k) for k in ARITHMETIC_RUNTIME},
    }
    cell = _numbers(cell, "cell")
    cell["train_hash"] = config_hash(cell)
    return cell


def resolve_evaluation(config: Mapping[str, Any], recipe: str,
                       recipes: Mapping[str, Dict[str, Any]] | None = None) -> Dict[str, Any]:
    """The evaluation identity for a recipe's cells: the config's ``evaluation`` block deep-merged
    with the recipe's own ``evaluation`` (which wins), then with the config's
    ``recipe_evaluation[recipe]`` (which wins over both), fractions resolved, ``eval_hash`` added.

    ``checkpoints`` is left out: it chooses which outputs exist, not how one is computed.
    """
    recipes = load_recipes(config) if recipes is None else recipes
    if recipe not in recipes:
        raise ConfigError(f"unknown recipe {recipe!r}; known: {sorted(recipes)}")
    spec = deep_merge(config.get("evaluation", {}), recipes[recipe].get("evaluation", {}))
    # The run config's own additions for this recipe (``recipe_evaluation``), merged last: one
    # run can give a few recipes an attack the others do not need (claims.yaml: AutoAttack only
    # where a claim reads it) without a second recipe of the same training.
    spec = deep_merge(spec, (config.get("recipe_evaluation") or {}).get(recipe, {}))
    spec.pop("checkpoints", None)
    spec = _numbers(spec, "evaluation")
    # Attack specs normalized (defaults filled, labels unique), so an equivalent spelling is the
    # same identity and a bad spec fails while the DAG is built, before any job runs.
    try:
        spec["attacks"] = check_attack_specs(spec.get("attacks"))
        compare = (spec.get("autoattack") or {}).get("compare_pgd")
        if compare:
            spec["autoattack"]["compare_pgd"] = normalize_attack_spec(
                compare, "evaluation.autoattack.compare_pgd")
    except AttackSpecError as e:
        raise ConfigError(f"recipe {recipe!r}: {e}") from None
    # Defence specs (methods.defenses.specs) likewise, only where the block names them, so an
    # evaluation without defences keeps its identity.
    try:
        for key, check in (("defenses", check_defense_specs),
                           ("defense_attacks", check_defense_attacks),
                           ("defense_autoattack", normalize_defense_autoattack)):
            if key in spec:
                spec[key] = check(spec[key], f"evaluation.{key}")
    except (DefenseSpecError, AttackSpecError) as e:
        raise ConfigError(f"recipe {recipe!r}: {e}") from None
    spec["eval_hash"] = config_hash(spec)
    return spec


def recipe_annotations(recipes: Mapping[str, Dict[str, Any]], names) -> Dict[str, Dict[str, Any]]:
    """``{recipe: {paper, notes, published}}`` for the tables: text and published-row links that
    change no computed number, so editing them reruns only the tables."""
    # Published links stay as written: they are matched as text against the published CSVs.
    return {name: {"paper": recipes[name].get("paper", ""), "notes": recipes[name].get("notes", ""),
                   "published": recipes[name].get("published", {})}
            for name in sorted(set(names))}


def cell_dir(results_dir: str, dataset: str, arch: str, method: str, recipe: str,
             seed: int) -> str:
    return f"{results_dir}/{dataset}/{arch}/{method}/{recipe}/seed{seed}"


def eval_checkpoints(config: Mapping[str, Any]) -> List[str]:
    return list(config.get("evaluation", {}).get("checkpoints", ["last"]))
