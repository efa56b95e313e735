"""Evaluation-time defence specs and the attacks run against defences: parsing, defaults,
labels.  No torch (imported by :mod:`methods.config` while the DAG is built).

An evaluation lists its defences as small mappings (``evaluation.defenses``), the attacks run
against every defence (``evaluation.defense_attacks``) and, optionally, AutoAttack against every
randomized defence (``evaluation.defense_autoattack``)::

    evaluation:
      defenses:
        - {name: mi_ol}                      # MI-OL, lam 0.5, N 30 (mixup models)
        - {name: mi_ol, lam: 0.6}            # MI-OL(λ=0.6): the IAT setting
        - {name: gaussian}                   # GaussianNoise(σ=0.05)
      defense_attacks:
        - {name: pgd, steps: 10, alpha: 2/255, modes: [oblivious, adaptive], eot_samples: 20}
        - {name: pgd, steps: 10, alpha: 2/255, targeted: random, modes: [oblivious]}
      # keys: "MI-OL | PGD-10-1-alpha=2/255-no_early_stop | oblivious", "... | adaptive-EOT-20"
      defense_autoattack: {version: rand}

Defences (``name``; ``-`` = no default).  Every randomized defence averages the softmax of
``samples`` independent draws (Mixup Inference's Algorithm 1; the baselines of its
``attack_resnet_baselines.py``).  Defaults are the official code's / README's
(``P2333/Mixup-Inference@6d164cba``):

==============  =====================================================================  =========
name            fields (default)                                                       label
==============  =====================================================================  =========
``mi_pl``       ``lam`` 0.5, ``samples`` 10 (``num_sample`` of
                ``attack_resnet_mixuptest_PL.py``), pool fields, ``pool_size`` 1000    MI-PL
``mi_ol``       ``lam`` 0.5 (mixup models; the README uses 0.6 for IAT models),
                ``samples`` 30, pool fields, ``pool_size`` 10000                       MI-OL
``mi_combined`` ``lam_pl`` 0.5, ``samples_pl`` 5, ``lam_ol`` 0.4, ``samples_ol`` 15,
                ``threshold`` 0.2, pool fields, ``pool_size`` 10000                    MI-Combined
``gaussian``    ``sigma`` 0.05, ``sigma_scale`` ``minus1_1`` | ``unit``, ``samples`` 50  GaussianNoise(σ=0.05)
``rotation``    ``degrees`` 20, ``samples`` 50, ``uint8`` true                         Rotation(±20°)
``xie``         ``shrink`` ``crop`` | ``resize``, ``min_size`` / ``max_size`` null,
                ``samples`` 50, ``uint8`` true                                         Xie-CropPad
``guo``         ``min_size`` / ``max_size`` null, ``samples`` 50, ``uint8`` true        Guo-CropRescale
``identity``    none (the base model itself; a deterministic check)                    Identity
==============  =====================================================================  =========

Pool fields (Mixup Inference's sampling pool p_s, from which the mixing partners x_s are drawn):
``pool``: ``auto`` (default: the validation split if it has images, else the training split
with its clean labels), ``val``, ``train``, or ``test_split_as_official`` (the official code's
pool: the test split itself, which holds the evaluated images); ``pool_size``: how many images,
a seeded class-stratified draw (the official code takes the first 10,000 of a shuffled test
loader, 1,000 for MI-PL); ``pool_augmentation``: ``training`` (default, as the official loader:
the cell's training augmentation applied once to every pool image) or ``none``.

Labels: the base name, then in parentheses every field whose value differs from its default
(``MI-OL(λ=0.6)``, ``MI-OL(pool=test_split_as_official)``); Gaussian noise and rotation always
show their strength (``GaussianNoise(σ=0.05)``, ``Rotation(±20°)``).  Xie's label names its
shrink step: ``Xie-CropPad`` (as the official baseline codes it: a random crop, then a random
zero pad) or ``Xie-ResizePad`` (Xie et al.'s own random resize).  Two defences with one label
are refused (:func:`check_defense_specs`).

Attacks against defences (``evaluation.defense_attacks``): an attack spec
(:mod:`methods.attack_specs`) plus

* ``labels``: ``predicted`` (default for untargeted attacks, as the official code: ``y = None``,
  the attacked predictor's prediction on the clean input) or ``true``; targeted attacks draw
  their targets against the true label and take only ``true`` (the default for them);
* ``modes``: any of ``oblivious`` (crafted on the base model, then the defence is applied to
  the adversarial input, as the paper) and ``adaptive`` (crafted against the defended predictor,
  gradients averaged over ``eot_samples`` draws of its randomness per step: EOT); default both;
* ``eot_samples`` (default 20, AutoAttack 'rand''s EOT count): draws per gradient step;
* ``eot_redraw``: ``step`` (default: fresh draws every step, the expectation) or ``once`` (the
  same random numbers at every step, as the official ``attack_resnet_mixuptest_OL_adaptive.py``
  fixes the mixing partners per input; with ``early_stop: true`` the numbers stay fixed per
  step but pass to the examples still attacked);
* ``targeted_rule`` (targeted attacks only): ``true_label`` (default, the official code's
  number: robust when the defended prediction on x_adv is the true label) or ``no_target`` (the
  suite's base-model rule: right on the clean input and no target reached).

Two attack-spec defaults differ against defences, both to follow the official protocol
(cleverhans ``projected_gradient_descent`` in ``MI/pgd.py``): PGD's ``early_stop`` is false (the
official PGD runs every step for every example; an oblivious x_adv stopped as soon as the base
model is fooled sits at its decision boundary and transfers far less to the defended
predictor), so PGD keys carry ``-no_early_stop`` unless ``early_stop: true`` is set; and
``labels`` is ``predicted`` as above.  The official PGD starts uniformly in the eps-ball
(``rand_init=True``), one restart: the spec's own defaults.

Metric keys (:func:`metric_key`): ``"<defence> | clean"`` and ``"<defence> | <attack> | <mode>"``
where ``<attack>`` is the attack's label (plus ``-labels=true`` for an untargeted attack on true
labels, ``-no_target_rule`` for a targeted one scored by the suite's rule) and ``<mode>`` is
``oblivious``, ``adaptive`` (deterministic defence: no EOT), ``adaptive-EOT-<k>`` or
``adaptive-EOT-<k>-fixed`` (``eot_redraw: once``).

Errors are :class:`DefenseSpecError` (a ``ValueError``) naming the field, e.g.
``evaluation.defenses[1].lam``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..attack_specs import attack_label, normalize_attack_spec
from ..registry import Registry

_REQUIRED = object()
#: Where Mixup Inference draws its partners from (see the module docstring).
POOL_SOURCES = ("auto", "val", "train", "test_split_as_official")
POOL_AUGMENTATIONS = ("training", "none")
MODES = ("oblivious", "adaptive")
LABEL_POLICIES = ("predicted", "true")
EOT_REDRAW = ("step", "once")
#: AutoAttack 'rand' averages 20 gradients per step; the same default here.
DEFAULT_EOT_SAMPLES = 20
#: How a targeted attack against a defence is scored: ``true_label`` (the official code's
#: accuracy: the defended prediction on x_adv is the true label) or ``no_target`` (the suite's
#: rule for the base model: right on the clean input and no target reached).
TARGETED_RULES = ("true_label", "no_target")
#: Attacks whose ``early_stop`` defaults to false against defences (the official PGD runs every
#: step for every example).
EARLY_STOP_OFF = ("pgd",)
#: Keys of a defence-attack entry that are not attack-spec fields.
DEFENSE_ATTACK_KEYS = ("labels", "modes", "eot_samples", "eot_redraw", "targeted_rule")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")


class DefenseSpecError(ValueError):
    """A defence spec is wrong; the message names the field (``evaluation.defenses[0].lam``)."""


# ----------------------------------------------------------------------------- value parsers

def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        num, _, den = value.replace(" ", "").partition("/")
        try:
            out = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            out = math.nan
    else:
        out = math.nan
    if not math.isfinite(out):
        raise DefenseSpecError(f"{where}: expected a number or a fraction like '1/2', got {value!r}")
    return out


def _positive(value: Any, where: str) -> float:
    out = _number(value, where)
    if out <= 0:
        raise DefenseSpecError(f"{where}: must be > 0, got {value!r}")
    return out


def _ratio(value: Any, where: str) -> float:
    """A mixup ratio lambda in (0, 1]: the weight of the input in lam * x + (1 - lam) * x_s."""
    out = _number(value, where)
    if not 0 < out <= 1:
        raise DefenseSpecError(f"{where}: must be in (0, 1], got {value!r}")
    return out


def _unit(value: Any, where: str) -> float:
    out = _number(value, where)
    if not 0 <= out <= 1:
        raise DefenseSpecError(f"{where}: must be in [0, 1], got {value!r}")
    return out


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DefenseSpecError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def _optional_count(value: Any, where: str) -> Optional[int]:
    return None if value is None else _count(value, where)


def _optional_int(value: Any, where: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DefenseSpecError(f"{where}: expected an integer, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DefenseSpecError(f"{where}: expected true or false, got {value!r}")
    return value


def _choice(options: Tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise DefenseSpecError(f"{where}: expected one of {list(options)}, got {value!r}")
    return parse


def _strings(value: Any, where: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(v, str) for v in value):
        raise DefenseSpecError(f"{where}: expected a non-empty list of names, got {value!r}")
    return list(value)


def _g(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------- defence kinds

@dataclass(frozen=True)
class Field:
    """One defence field: default (``_REQUIRED`` if none), parser, and the label token it adds
    when its value differs from the default (``always``: whatever the value)."""

    parse: Callable[[Any, str], Any]
    default: Any = _REQUIRED
    token: Optional[Callable[[Any], str]] = None
    always: bool = False


@dataclass(frozen=True)
class DefenseKind:
    """The spec of one defence name.  ``randomized``: its predictor draws randomness (EOT
    applies, AutoAttack 'rand' is run against it); ``uses_pool``: it needs a sampling pool."""

    fields: Dict[str, Field]
    base_label: Callable[[Dict[str, Any]], str]
    randomized: bool = True
    uses_pool: bool = False
    check: Callable[[Dict[str, Any], str], None] = lambda spec, where: None


#: Defence name -> :class:`DefenseKind`.  The torch implementations register the same names in
#: :data:`methods.registry.DEFENSES`.
DEFENSE_KINDS: Registry[DefenseKind] = Registry("defense")


def _samples(default: int, token: str = "N") -> Field:
    return Field(_count, default, lambda v: f"{token}={v}")


def _pool_fields(size: int) -> Dict[str, Field]:
    return {"pool": Field(_choice(POOL_SOURCES), "auto", lambda v: f"pool={v}"),
            "pool_size": Field(_count, size, lambda v: f"pool_size={v}"),
            "pool_augmentation": Field(_choice(POOL_AUGMENTATIONS), "training",
                                       lambda v: f"pool_augmentation={v}")}


def _lam(default: float, name: str = "λ") -> Field:
    return Field(_ratio, default, lambda v: f"{name}={_g(v)}")


UINT8 = Field(_flag, True, lambda v: "float")
SIZES = {"min_size": Field(_optional_count, None, lambda v: f"min={v}"),
         "max_size": Field(_optional_count, None, lambda v: f"max={v}")}


def _check_sizes(spec: Dict[str, Any], where: str) -> None:
    lo, hi = spec["min_size"], spec["max_size"]
    if lo is not None and hi is not None and lo > hi:
        raise DefenseSpecError(f"{where}.min_size: {lo} is above max_size {hi}")


DEFENSE_KINDS.register("mi_pl")(DefenseKind(
    fields={"lam": _lam(0.5), "samples": _samples(10), **_pool_fields(1000)},
    base_label=lambda spec: "MI-PL", uses_pool=True))

DEFENSE_KINDS.register("mi_ol")(DefenseKind(
    fields={"lam": _lam(0.5), "samples": _samples(30), **_pool_fields(10000)},
    base_label=lambda spec: "MI-OL", uses_pool=True))

DEFENSE_KINDS.register("mi_combined")(DefenseKind(
    fields={"lam_pl": _lam(0.5, "λ_PL"), "samples_pl": _samples(5, "N_PL"),
            "lam_ol": _lam(0.4, "λ_OL"), "samples_ol": _samples(15, "N_OL"),
            "threshold": Field(_unit, 0.2, lambda v: f"threshold={_g(v)}"),
            **_pool_fields(10000)},
    base_label=lambda spec: "MI-Combined", uses_pool=True))

DEFENSE_KINDS.register("gaussian")(DefenseKind(
    fields={"sigma": Field(_positive, 0.05, lambda v: f"σ={_g(v)}", always=True),
            "sigma_scale": Field(_choice(("minus1_1", "unit")), "minus1_1",
                                 lambda v: "σ-on-[0,1]"),
            "samples": _samples(50)},
    base_label=lambda spec: "GaussianNoise"))

DEFENSE_KINDS.register("rotation")(DefenseKind(
    fields={"degrees": Field(_positive, 20.0, lambda v: f"±{_g(v)}°", always=True),
            "samples": _samples(50), "uint8": UINT8},
    base_label=lambda spec: "Rotation"))

DEFENSE_KINDS.register("xie")(DefenseKind(
    fields={"shrink": Field(_choice(("crop", "resize")), "crop"), **SIZES,
            "samples": _samples(50), "uint8": UINT8},
    base_label=lambda spec: "Xie-CropPad" if spec["shrink"] == "crop" else "Xie-ResizePad",
    check=_check_sizes))

DEFENSE_KINDS.register("guo")(DefenseKind(
    fields={**SIZES, "samples": _samples(50), "uint8": UINT8},
    base_label=lambda spec: "Guo-CropRescale", check=_check_sizes))

DEFENSE_KINDS.register("identity")(DefenseKind(
    fields={}, base_label=lambda spec: "Identity", randomized=False))


# ----------------------------------------------------------------------------- defences

def defense_names() -> List[str]:
    return DEFENSE_KINDS.names()


def normalize_defense_spec(spec: Mapping[str, Any], where: str = "defense") -> Dict[str, Any]:
    """The normalized copy of one defence spec: ``name`` first, then every field of that
    defence with defaults filled.  Idempotent; raises :class:`DefenseSpecError` naming
    ``where.<field>``."""
    if not isinstance(spec, Mapping):
        raise DefenseSpecError(f"{where}: expected a mapping like {{name: mi_ol}}, got {spec!r}")
    name = spec.get("name")
    if name is None:
        raise DefenseSpecError(f"{where}: missing field 'name' (one of {defense_names()})")
    if name not in DEFENSE_KINDS:
        raise DefenseSpecError(f"{where}.name: unknown defense {name!r}; known: {defense_names()}")
    kind = DEFENSE_KINDS.get(name)
    unknown = sorted(set(spec) - {"name"} - set(kind.fields))
    if unknown:
        raise DefenseSpecError(f"{where}: unknown key {unknown[0]!r} for defense {name!r}; "
                               f"known: {sorted(kind.fields)}")
    out: Dict[str, Any] = {"name": name}
    for key, f in kind.fields.items():
        if key in spec:
            out[key] = f.parse(spec[key], f"{where}.{key}")
        elif f.default is _REQUIRED:
            raise DefenseSpecError(f"{where}.{key}: missing (required for defense {name!r})")
        else:
            out[key] = f.default
    kind.check(out, where)
    return out


def defense_label(spec: Mapping[str, Any]) -> str:
    """The label of a defence spec (raw or normalized): see the module docstring."""
    spec = normalize_defense_spec(spec)
    kind = DEFENSE_KINDS.get(spec["name"])
    tokens = [f.token(spec[key]) for key, f in kind.fields.items()
              if f.token is not None and (f.always or spec[key] != f.default)]
    base = kind.base_label(spec)
    return f"{base}({','.join(tokens)})" if tokens else base


def is_randomized(spec: Mapping[str, Any]) -> bool:
    return DEFENSE_KINDS.get(spec["name"]).randomized


def check_defense_specs(specs: Optional[Sequence[Mapping[str, Any]]],
                        where: str = "evaluation.defenses") -> List[Dict[str, Any]]:
    """Normalize a list of defence specs and check that their labels are unique."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise DefenseSpecError(f"{where}: expected a list of defense specs, got {specs!r}")
    out = [normalize_defense_spec(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    seen: Dict[str, int] = {}
    for i, spec in enumerate(out):
        label = defense_label(spec)
        if label in seen:
            raise DefenseSpecError(f"{where}[{seen[label]}] and {where}[{i}] have the same label "
                                   f"{label!r}: they are the same defense: drop one")
        seen[label] = i
    return out


# ----------------------------------------------------------------------------- attacks on defences

def split_defense_attack(spec: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(attack spec, defence options)`` of a defence-attack entry (raw or normalized)."""
    attack = {k: v for k, v in spec.items() if k not in DEFENSE_ATTACK_KEYS}
    options = {k: spec[k] for k in DEFENSE_ATTACK_KEYS if k in spec}
    return attack, options


def _modes(value: Any, where: str) -> List[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise DefenseSpecError(f"{where}: expected a non-empty list of {list(MODES)}, got {value!r}")
    modes = [_choice(MODES)(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if len(set(modes)) != len(modes):
        raise DefenseSpecError(f"{where}: {value!r} repeats a mode")
    return [m for m in MODES if m in modes]   # canonical order: one spelling, one identity


def normalize_defense_attack(spec: Mapping[str, Any], where: str = "defense_attack") -> Dict[str, Any]:
    """The normalized copy of one defence-attack entry: the attack spec normalized
    (:func:`methods.attack_specs.normalize_attack_spec`, which names ``where.<field>`` in its
    errors; PGD's ``early_stop`` defaults to false here, see the module docstring) plus
    ``labels``, ``modes``, ``eot_samples``, ``eot_redraw`` and ``targeted_rule``.  Idempotent."""
    if not isinstance(spec, Mapping):
        raise DefenseSpecError(f"{where}: expected a mapping like {{name: pgd, steps: 10, ...}}, "
                               f"got {spec!r}")
    attack, options = split_defense_attack(spec)
    if attack.get("name") in EARLY_STOP_OFF and "early_stop" not in attack:
        attack = {**attack, "early_stop": False}
    out = normalize_attack_spec(attack, where)
    policy = out.get("targeted")
    labels = options.get("labels", "true" if policy else "predicted")
    labels = _choice(LABEL_POLICIES)("true" if labels is True else labels,   # YAML's bare true
                                     f"{where}.labels")
    if policy and labels == "predicted":
        raise DefenseSpecError(f"{where}.labels: 'predicted' applies to untargeted attacks; a "
                               f"targeted attack (targeted: {policy}) draws its targets against "
                               f"the true label: use labels: true or leave it out")
    out["labels"] = labels
    out["modes"] = _modes(options.get("modes", list(MODES)), f"{where}.modes")
    out["eot_samples"] = _count(options.get("eot_samples", DEFAULT_EOT_SAMPLES), f"{where}.eot_samples")
    out["eot_redraw"] = _choice(EOT_REDRAW)(options.get("eot_redraw", "step"), f"{where}.eot_redraw")
    rule = options.get("targeted_rule")
    if not policy:
        if rule is not None:
            raise DefenseSpecError(f"{where}.targeted_rule: applies to targeted attacks only "
                                   f"(this one is untargeted), got {rule!r}")
        out["targeted_rule"] = None
    else:
        out["targeted_rule"] = _choice(TARGETED_RULES)(rule or "true_label", f"{where}.targeted_rule")
    return out


def defense_attack_label(spec: Mapping[str, Any]) -> str:
    """The attack part of a metric key: the attack's label, plus ``-labels=true`` for an
    untargeted attack on the true labels (``predicted`` is the default against defences)."""
    spec = normalize_defense_attack(spec)
    attack, _ = split_defense_attack(spec)
    label = attack_label(attack)
    if not spec.get("targeted") and spec["labels"] == "true":
        label += "-labels=true"
    if spec["targeted_rule"] == "no_target":
        label += "-no_target_rule"
    return label


def mode_label(spec: Mapping[str, Any], mode: str, randomized: bool) -> str:
    """``oblivious``; ``adaptive`` against a deterministic defence (no randomness to average);
    ``adaptive-EOT-<k>`` (``-fixed`` when ``eot_redraw: once``) against a randomized one."""
    if mode not in MODES:
        raise DefenseSpecError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if mode == "oblivious" or not randomized:
        return mode
    spec = normalize_defense_attack(spec)
    token = f"adaptive-EOT-{spec['eot_samples']}"
    return token + "-fixed" if spec["eot_redraw"] == "once" else token


def effective_eot_samples(spec: Mapping[str, Any], randomized: bool) -> int:
    """Draws per gradient step: ``eot_samples`` against a randomized defence, else 1."""
    return int(spec["eot_samples"]) if randomized else 1


def metric_key(defense: str, attack: Optional[str] = None, mode: Optional[str] = None) -> str:
    """``"<defence> | clean"`` or ``"<defence> | <attack> | <mode>"``."""
    if attack is None:
        return f"{defense} | clean"
    return f"{defense} | {attack} | {mode}"


def check_defense_attacks(specs: Optional[Sequence[Mapping[str, Any]]],
                          where: str = "evaluation.defense_attacks") -> List[Dict[str, Any]]:
    """Normalize a list of defence-attack entries; two entries that would write the same
    metric key against a randomized defence are refused, naming both."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise DefenseSpecError(f"{where}: expected a list of attack specs, got {specs!r}")
    out = [normalize_defense_attack(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    seen: Dict[Tuple[str, str], int] = {}
    for i, spec in enumerate(out):
        for mode in spec["modes"]:
            key = (defense_attack_label(spec), mode_label(spec, mode, randomized=True))
            if key in seen:
                raise DefenseSpecError(f"{where}[{seen[key]}] and {where}[{i}] both write "
                                       f"'{key[0]} | {key[1]}': drop one")
            seen[key] = i
    return out


# ----------------------------------------------------------------------------- AutoAttack

_AUTOATTACK_FIELDS: Dict[str, Field] = {
    "enabled": Field(_flag, True),
    "version": Field(_choice(AUTOATTACK_VERSIONS), "rand"),
    "attacks": Field(_strings, None),
    "draws": Field(_optional_count, None),
    "n": Field(_optional_count, None),
    "seed": Field(_optional_int, None),
    "batch_size": Field(_optional_count, None),
    "iterations": Field(_optional_count, None),
    "eot_iter": Field(_optional_count, None),
}


def normalize_defense_autoattack(spec: Optional[Mapping[str, Any]],
                                 where: str = "evaluation.defense_autoattack") -> Optional[Dict[str, Any]]:
    """AutoAttack against every randomized defence, through :mod:`methods.autoattack_adapter`:
    ``enabled`` (true), ``version`` (``rand``: APGD-CE and APGD-DLR with 20 EOT draws per
    step), ``attacks`` (``custom`` only), ``draws`` (defence draws averaged per forward of the
    module AutoAttack attacks; null = the defence's own ``samples``), ``n`` / ``seed`` (null =
    the plain ``autoattack`` block's, so the subset is the same), ``batch_size``, and
    ``iterations`` / ``eot_iter`` (null = the version's own APGD budget: 100 iterations, 20 EOT
    draws for 'rand'; smaller only for smoke runs, and recorded).  ``None`` stays ``None``."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise DefenseSpecError(f"{where}: expected a mapping like {{version: rand}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_AUTOATTACK_FIELDS))
    if unknown:
        raise DefenseSpecError(f"{where}: unknown key {unknown[0]!r}; known: {sorted(_AUTOATTACK_FIELDS)}")
    out = {key: f.parse(spec[key], f"{where}.{key}") if key in spec else f.default
           for key, f in _AUTOATTACK_FIELDS.items()}
    if (out["version"] == "custom") != (out["attacks"] is not None):
        raise DefenseSpecError(f"{where}.attacks: needed with version 'custom' and only then "
                               f"(version {out['version']!r}, attacks {out['attacks']!r})")
    return out
