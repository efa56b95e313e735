"""The parameters each registered method and model declares, read from the source: no torch.

:mod:`methods.config_checks` checks ``method_args`` and arch arguments while the Snakefile
builds the DAG, which must not import torch (``tests/test_layering.py``; importing the method
registry costs seconds per Snakemake start).  So the declarations are read with :mod:`ast`: the
keyword-only arguments, with their annotations, of ``__init__`` of every class decorated
``@METHODS.register(name)`` in ``methods/algorithms`` (``threat`` aside; an inherited
``__init__`` is followed through base classes of the package) and of every builder decorated
``@MODELS.register(name)`` in ``methods/models``.  ``tests/test_config_validation.py`` checks
the reading against ``Method.parameters()`` and ``arch_defaults()`` for every registered name,
and that every default passes its own annotation (:func:`annotation_check`).
"""
from __future__ import annotations

import ast
import functools
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .config import FRACTION, REPO_ROOT

Check = Tuple[Callable[[Any], bool], str]        # (accepts the value, what is allowed)


def _registered(package: str, registry: str) -> Tuple[Dict[str, ast.AST], Dict[str, ast.ClassDef]]:
    """``{name: node}`` of every ``@<registry>.register("name")`` class or function in
    ``methods/<package>/*.py``, and every class there by name (to follow inherited ``__init__``)."""
    found: Dict[str, ast.AST] = {}
    classes: Dict[str, ast.ClassDef] = {}
    for path in sorted((REPO_ROOT / "methods" / package).glob("*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
            for dec in getattr(node, "decorator_list", []):
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and dec.func.attr == "register" and isinstance(dec.func.value, ast.Name)
                        and dec.func.value.id == registry and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    found[dec.args[0].value] = node
    return found, classes


def _keyword_args(fn: Optional[ast.FunctionDef]) -> Dict[str, Optional[ast.expr]]:
    if fn is None:
        return {}
    return {a.arg: a.annotation for a in fn.args.kwonlyargs if a.arg != "threat"}


@functools.lru_cache(maxsize=None)
def method_inits() -> Dict[str, Optional[ast.FunctionDef]]:
    """``{method: its __init__ node}`` for every registered method, an inherited ``__init__``
    followed through the package's base classes (None when there is none)."""
    found, classes = _registered("algorithms", "METHODS")
    out = {}
    for name, node in found.items():
        init = None
        while init is None and node is not None:
            init = next((b for b in node.body if isinstance(b, ast.FunctionDef)
                         and b.name == "__init__"), None)
            bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
            node = classes[bases[0]] if init is None and bases else None
        out[name] = init
    return out


@functools.lru_cache(maxsize=None)
def method_parameters() -> Dict[str, Dict[str, Optional[ast.expr]]]:
    """``{method: {parameter: annotation}}``: the keyword-only arguments of each registered
    method's ``__init__`` (``threat`` aside), read from ``methods/algorithms`` without importing
    it."""
    return {name: _keyword_args(init) for name, init in method_inits().items()}


@functools.lru_cache(maxsize=None)
def model_parameters() -> Dict[str, Dict[str, Optional[ast.expr]]]:
    """``{model: {arch arg: annotation}}``: each registered builder's keyword-only arguments."""
    found, _ = _registered("models", "MODELS")
    return {name: _keyword_args(node) for name, node in found.items()}


def is_number(v: Any) -> bool:
    if isinstance(v, str) and FRACTION.fullmatch(v):
        num, _, den = v.replace(" ", "").partition("/")
        return float(den) != 0
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def as_float(v: Any) -> float:
    if isinstance(v, str):
        num, _, den = v.replace(" ", "").partition("/")
        return float(num) / float(den)
    return float(v)


_BASIC: Dict[str, Check] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (is_number, "a number (or a fraction like '2/255')"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}
_NULL: Check = (lambda v: v is None, "null")


def annotation_check(ann: Optional[ast.expr]) -> Optional[Check]:
    """What a parameter's annotation allows in YAML; ``None`` when it says nothing checkable."""
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        ann = ast.parse(ann.value, mode="eval").body
    if isinstance(ann, ast.Constant) and ann.value is None:
        return _NULL
    if isinstance(ann, ast.Name):
        return _BASIC.get(ann.id)
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return _any_of([annotation_check(ann.left), annotation_check(ann.right)])
    if isinstance(ann, ast.Subscript):
        head = getattr(ann.value, "id", getattr(ann.value, "attr", ""))
        args = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if head == "Optional":
            return _any_of([annotation_check(args[0]), _NULL])
        if head == "Union":
            return _any_of([annotation_check(a) for a in args])
        if head in ("Sequence", "List", "list", "Tuple", "tuple"):
            item = annotation_check(args[0])
            if item is None:
                return (lambda v: isinstance(v, list), "a list")
            return (lambda v: isinstance(v, list) and all(item[0](x) for x in v),
                    f"a list (each item {item[1]})")
        if head in ("Mapping", "Dict", "dict"):
            return (lambda v: isinstance(v, Mapping), "a mapping")
    return None


def _any_of(checks) -> Optional[Check]:
    if any(c is None for c in checks):
        return None
    return (lambda v: any(c[0](v) for c in checks), " or ".join(c[1] for c in checks))
