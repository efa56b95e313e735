"""The dataset entry of the workflow config, validated into a frozen record.

::

    cifar10:        {source: cifar10, val_size: 1000}
    cifar10-lt100:  {source: cifar10, long_tail: {imbalance_factor: 100, meta_per_class: 10}, seed: 0}
    cifar10-sym40:  {source: cifar10, label_noise: {kind: symmetric, rate: 0.4}, seed: 0}

Fields:

* ``source`` (required): a name registered in :data:`methods.registry.DATASETS`.
* ``val_size``: size of the class-stratified val set held out of the train split (default: the
  source's ``default_val_size``: 500 for mnist5k, 1000 otherwise; 0 gives an empty val).  Not
  allowed together with ``long_tail``, whose balanced meta set is the val set.
* ``split_seed`` (default 0): which train images are held out as val / meta set.
* ``seed`` (default 0): the variant draws -- which images the long tail keeps, and the label noise.
* ``long_tail``: ``{imbalance_factor: >= 1 (required), meta_per_class: int >= 0 (default 10, the
  IADA / Meta-Weight-Net meta set)}``.
* ``label_noise``: ``{kind: symmetric | pair (required), rate: [0, 1) (required),
  include_true_class: bool (default false; symmetric only)}``.

Errors are ``ValueError`` naming the dataset, the field and the bad value.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from ..registry import DATASETS
from .variants import NOISE_KINDS

_TOP = ("source", "val_size", "split_seed", "seed", "long_tail", "label_noise")
_LONG_TAIL = ("imbalance_factor", "meta_per_class")
_NOISE = ("kind", "rate", "include_true_class")


@dataclass(frozen=True)
class LongTail:
    imbalance_factor: float
    meta_per_class: int = 10


@dataclass(frozen=True)
class LabelNoise:
    kind: str
    rate: float
    include_true_class: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    source: str
    val_size: Optional[int]       # None when long_tail defines the val set
    split_seed: int = 0
    seed: int = 0
    long_tail: Optional[LongTail] = None
    label_noise: Optional[LabelNoise] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


class _Checker:
    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"dataset {self.name!r}: spec field {field!r} {why}, got {value!r}")

    def keys(self, d: Any, allowed: tuple, field: str) -> Mapping[str, Any]:
        if not isinstance(d, Mapping):
            raise self.fail(field or "<spec>", d, "must be a mapping")
        for k in d:
            if k not in allowed:
                where = f"{field}.{k}" if field else str(k)
                raise ValueError(f"dataset {self.name!r}: unknown spec field {where!r} "
                                 f"(value {d[k]!r}); allowed: {list(allowed)}")
        return d

    def int_(self, d: Mapping, key: str, field: str, default: int, lo: int = 0) -> int:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self.fail(field, v, f"must be an integer >= {lo}")
        return v

    def number(self, d: Mapping, key: str, field: str) -> float:
        if key not in d:
            raise self.fail(field, None, "is required")
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(field, v, "must be a finite number")
        return float(v)


def parse_spec(name: str, spec: Mapping[str, Any]) -> DatasetSpec:
    """Validate ``spec`` (the config entry of dataset ``name``) and fill in the defaults."""
    ck = _Checker(name)
    d = ck.keys(spec, _TOP, "")
    source = d.get("source")
    if source is None:
        raise ck.fail("source", None, "is required")
    if not isinstance(source, str) or source not in DATASETS:
        raise ck.fail("source", source, f"must be one of {DATASETS.names()}")

    long_tail = None
    if d.get("long_tail") is not None:
        lt = ck.keys(d["long_tail"], _LONG_TAIL, "long_tail")
        factor = ck.number(lt, "imbalance_factor", "long_tail.imbalance_factor")
        if not factor >= 1:
            raise ck.fail("long_tail.imbalance_factor", lt["imbalance_factor"], "must be >= 1")
        long_tail = LongTail(factor, ck.int_(lt, "meta_per_class", "long_tail.meta_per_class", 10))

    noise = None
    if d.get("label_noise") is not None:
        ln = ck.keys(d["label_noise"], _NOISE, "label_noise")
        kind = ln.get("kind")
        if kind not in NOISE_KINDS:
            raise ck.fail("label_noise.kind", kind, f"must be one of {list(NOISE_KINDS)}")
        rate = ck.number(ln, "rate", "label_noise.rate")
        if not 0.0 <= rate < 1.0:
            raise ck.fail("label_noise.rate", ln["rate"], "must be in [0, 1)")
        inc = ln.get("include_true_class", False)
        if not isinstance(inc, bool):
            raise ck.fail("label_noise.include_true_class", inc, "must be true or false")
        if inc and kind != "symmetric":
            raise ck.fail("label_noise.include_true_class", inc, "applies to kind 'symmetric' only")
        noise = LabelNoise(kind, rate, inc)

    if long_tail is not None:
        if "val_size" in d:
            raise ck.fail("val_size", d["val_size"], "cannot be combined with long_tail (its meta set "
                          "of long_tail.meta_per_class per class is the val set)")
        val_size = None
    else:
        val_size = ck.int_(d, "val_size", "val_size", DATASETS.get(source).default_val_size)
    return DatasetSpec(source=source, val_size=val_size,
                       split_seed=ck.int_(d, "split_seed", "split_seed", 0),
                       seed=ck.int_(d, "seed", "seed", 0), long_tail=long_tail, label_noise=noise)
