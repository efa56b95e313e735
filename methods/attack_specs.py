"""Evaluation attack specs: parsing, validation, defaults and labels.  No torch.

An evaluation lists its attacks as small mappings (``evaluation.attacks`` in the workflow
config, and ``evaluation.autoattack.compare_pgd``).  This module turns each into a *normalized
spec*: every field of its attack present, defaults filled, values checked.  It is imported by
the config layer, the Snakefile and the tables, so it must not import torch; the torch
implementations are registered under the same names in :data:`methods.registry.ATTACKS`
(:mod:`methods.attacks`).

Fields (``-`` = no default, the field is required):

========================  ======  =========  =================================================
field                     fgsm    pgd        meaning
========================  ======  =========  =================================================
``name``                  -       -          ``fgsm`` or ``pgd``
``norm``                  null    null       ``linf`` / ``l2``; null = the evaluation's threat
``eps``                   null    null       > 0; null = the evaluation's eps.  Setting
                                             ``norm`` requires ``eps`` (an eps belongs to a norm)
``steps``                         -          integer >= 1
``alpha``                         -          step size > 0 (a number or ``"2/255"``)
``restarts``                      1          integer >= 1; per-example worst case over restarts
``random_start``                  true       uniform start in the eps-ball; ``false`` needs
                                             ``restarts: 1`` (restarts would be identical)
``early_stop``                    true       per-example early stop (locuslab's evaluation)
``targeted``                      null       null (untargeted), ``random``, ``least_likely``
                                             or ``all`` (once per non-true class)
========================  ======  =========  =================================================

Labels (:func:`attack_label`) name the attack in metrics, tables and CSV columns, and are
derived from the whole spec.  The base is ``FGSM`` or ``PGD-<steps>-<restarts>``; PGD always
adds its step size ``alpha=<alpha>`` (it is required, so there is no default to leave out);
every other field that differs from its default adds a suffix, in this order: ``L2`` / ``Linf``
(norm), ``eps=<eps>`` (``eps=8/255`` when eps is k/255 and has no short decimal form, else
``eps=0.3``), ``targeted=<policy>``, ``zero_start`` (random start off), ``no_early_stop``.  So
``{name: pgd, steps: 40, alpha: 0.01}`` is ``PGD-40-1-alpha=0.01`` and the same with
``eps: 0.2, targeted: least_likely`` is ``PGD-40-1-alpha=0.01-eps=0.2-targeted=least_likely``.
Two specs have the same label only if they are the same attack; :func:`check_attack_specs`
raises if an evaluation lists one twice, naming both entries.  Errors are
:class:`AttackSpecError` (a ``ValueError``) naming the field, e.g. ``evaluation.attacks[1].steps``.

Targeted semantics (applied by :mod:`methods.evaluation`): a targeted run succeeds on an
example when the prediction equals its target; the example counts as robust when the model is
right on the clean input and no target was reached (``all``: none of the C - 1 targets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .registry import Registry

NORMS = ("linf", "l2")
#: ``targeted`` policies: ``random`` = one uniformly drawn wrong class per example (seeded),
#: ``least_likely`` = the class the model scores lowest on the clean input, ``all`` = every
#: wrong class in turn (an example is robust only if no target succeeds).
TARGET_POLICIES = ("random", "least_likely", "all")
_REQUIRED = object()


class AttackSpecError(ValueError):
    """An attack spec is wrong; the message names the field (``evaluation.attacks[1].steps``)."""


# ----------------------------------------------------------------------------- value parsers

def _number(value: Any, where: str) -> float:
    """A finite number from a YAML number or a fraction string such as ``"2/255"``."""
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
        raise AttackSpecError(f"{where}: expected a number or a fraction like '2/255', got {value!r}")
    return out


def _positive(value: Any, where: str) -> float:
    out = _number(value, where)
    if out <= 0:
        raise AttackSpecError(f"{where}: must be > 0, got {value!r}")
    return out


def _optional_positive(value: Any, where: str) -> Optional[float]:
    return None if value is None else _positive(value, where)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttackSpecError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise AttackSpecError(f"{where}: expected true or false, got {value!r}")
    return value


def _choice(options: Tuple[str, ...]) -> Callable[[Any, str], Optional[str]]:
    def parse(value: Any, where: str) -> Optional[str]:
        if value is None or value is False:
            return None
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise AttackSpecError(f"{where}: expected one of {list(options)} or null, got {value!r}")
    return parse


# ----------------------------------------------------------------------------- label tokens

def format_eps(eps: float) -> str:
    """``0.3`` -> ``"0.3"``, ``8/255`` -> ``"8/255"``, ``1.0`` -> ``"1"``; otherwise ``repr``."""
    short = f"{eps:g}"
    if float(short) == eps:
        return short
    k = eps * 255
    if abs(k - round(k)) < 1e-9 * max(1.0, k):
        return f"{round(k)}/255"
    return repr(eps)


_NORM_TOKEN = {"linf": "Linf", "l2": "L2"}


@dataclass(frozen=True)
class Field:
    """One spec field: its default (``_REQUIRED`` if none), its parser, and the label suffix
    it adds when its value differs from the default (``None``: never shown)."""

    parse: Callable[[Any, str], Any]
    default: Any = _REQUIRED
    token: Optional[Callable[[Any], str]] = None


NORM = Field(_choice(NORMS), None, lambda v: _NORM_TOKEN[v])
EPS = Field(_optional_positive, None, lambda v: f"eps={format_eps(v)}")


@dataclass(frozen=True)
class AttackKind:
    """The spec of one attack name: ordered fields, base label, cross-field checks."""

    fields: Dict[str, Field]
    base_label: Callable[[Dict[str, Any]], str]
    check: Callable[[Dict[str, Any], str], None] = lambda spec, where: None


#: Attack name -> :class:`AttackKind`.  The torch implementations register the same names
#: in :data:`methods.registry.ATTACKS`.
ATTACK_KINDS: Registry[AttackKind] = Registry("attack")


def _check_pgd(spec: Dict[str, Any], where: str) -> None:
    if spec["restarts"] > 1 and not spec["random_start"]:
        raise AttackSpecError(f"{where}.restarts: {spec['restarts']} restarts need random_start: "
                              f"true (restarts from the clean point are identical)")


ATTACK_KINDS.register("fgsm")(AttackKind(
    fields={"norm": NORM, "eps": EPS},
    base_label=lambda spec: "FGSM"))

ATTACK_KINDS.register("pgd")(AttackKind(
    fields={"steps": Field(_count), "restarts": Field(_count, 1),
            "alpha": Field(_positive, token=lambda v: f"alpha={format_eps(v)}"),
            "norm": NORM, "eps": EPS,
            "targeted": Field(_choice(TARGET_POLICIES), None, lambda v: f"targeted={v}"),
            "random_start": Field(_flag, True, lambda v: "zero_start"),
            "early_stop": Field(_flag, True, lambda v: "no_early_stop")},
    base_label=lambda spec: f"PGD-{spec['steps']}-{spec['restarts']}",
    check=_check_pgd))


# ----------------------------------------------------------------------------- public API

def attack_names() -> List[str]:
    return ATTACK_KINDS.names()


def normalize_attack_spec(spec: Mapping[str, Any], where: str = "attack") -> Dict[str, Any]:
    """The normalized copy of one spec: ``name`` first, then every field of that attack with
    defaults filled.  Idempotent.  Raises :class:`AttackSpecError` naming ``where.<field>`` for
    a missing ``name``, an unknown name or key, a missing required field or a bad value."""
    if not isinstance(spec, Mapping):
        raise AttackSpecError(f"{where}: expected a mapping like {{name: pgd, steps: 10, ...}}, "
                              f"got {spec!r}")
    name = spec.get("name")
    if name is None:
        raise AttackSpecError(f"{where}: missing field 'name' (one of {attack_names()})")
    if name not in ATTACK_KINDS:
        raise AttackSpecError(f"{where}.name: unknown attack {name!r}; known: {attack_names()}")
    kind = ATTACK_KINDS.get(name)
    unknown = sorted(set(spec) - {"name"} - set(kind.fields))
    if unknown:
        raise AttackSpecError(f"{where}: unknown key {unknown[0]!r} for attack {name!r}; "
                              f"known: {sorted(kind.fields)}")
    out: Dict[str, Any] = {"name": name}
    for key, f in kind.fields.items():
        if key in spec:
            out[key] = f.parse(spec[key], f"{where}.{key}")
        elif f.default is _REQUIRED:
            raise AttackSpecError(f"{where}.{key}: missing (required for attack {name!r})")
        else:
            out[key] = f.default
    if out.get("norm") is not None and out.get("eps") is None:
        raise AttackSpecError(f"{where}.norm: {out['norm']!r} needs an eps too (an eps belongs to "
                              f"a norm)")
    kind.check(out, where)
    return out


def attack_label(spec: Mapping[str, Any]) -> str:
    """The label of a spec (raw or normalized): see the module docstring for the rules."""
    spec = normalize_attack_spec(spec)
    kind = ATTACK_KINDS.get(spec["name"])
    parts = [kind.base_label(spec)]
    for key, f in kind.fields.items():
        if f.token is not None and spec[key] != f.default:
            parts.append(f.token(spec[key]))
    return "-".join(parts)


def check_attack_specs(specs: Optional[Sequence[Mapping[str, Any]]],
                       where: str = "evaluation.attacks") -> List[Dict[str, Any]]:
    """Normalize a list of specs (:func:`normalize_attack_spec`) and check that their labels
    are unique; a clash names both entries and both specs.  ``None`` is an empty list."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise AttackSpecError(f"{where}: expected a list of attack specs, got {specs!r}")
    out = [normalize_attack_spec(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    seen: Dict[str, int] = {}
    for i, spec in enumerate(out):
        label = attack_label(spec)
        if label in seen:
            j = seen[label]
            raise AttackSpecError(
                f"{where}[{j}] and {where}[{i}] have the same label {label!r}: {dict(specs[j])} "
                f"and {dict(specs[i])} are the same attack: drop one")
        seen[label] = i
    return out


def attack_threat(spec: Mapping[str, Any], base: Mapping[str, Any]) -> Dict[str, Any]:
    """The threat ``{"norm", "eps"}`` a normalized spec attacks under: its own ``norm`` / ``eps``
    where set, else ``base`` (the evaluation's threat)."""
    return {"norm": spec.get("norm") or str(base["norm"]).lower(),
            "eps": float(spec["eps"]) if spec.get("eps") is not None else float(base["eps"])}
