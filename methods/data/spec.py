"""The dataset entry of the workflow config, validated into a frozen record.

::

    cifar10:        {source: cifar10, val_size: 1000}
    cifar10-lt100:  {source: cifar10, long_tail: {imbalance_factor: 100, meta_per_class: 10}, seed: 0}
    cifar10-sym40:  {source: cifar10, label_noise: {kind: symmetric, rate: 0.4, meta_per_class: 10}}
    cmnist5k-90:    {source: cmnist5k, spurious: {correlation: 0.9}}
    waterbirds-64:  {source: waterbirds, image_size: 64}

Fields:

* ``source`` (required): a name registered in :data:`methods.registry.DATASETS`.
* ``val_size``: size of the class-stratified val set held out of the train split (default: the
  source's ``default_val_size``: 500 for mnist5k, 1000 otherwise; 0 gives an empty val).  Not
  allowed together with a meta set (``long_tail``, or ``label_noise.meta_per_class``: the
  balanced meta set is the val set), nor for sources with an official validation split
  (``waterbirds``, ``celeba``: that split is the val set).
* ``split_seed`` (default 0): which train images are held out as val / meta set.
* ``seed`` (default 0): the variant draws -- which images the long tail keeps, the label noise,
  and the colours of coloured MNIST.
* ``long_tail``: ``{imbalance_factor: >= 1 (required), meta_per_class: int >= 0 (default 10, the
  IADA / Meta-Weight-Net meta set)}``.
* ``label_noise``: ``{kind: symmetric | pair | flip (required), rate: [0, 1) (required),
  include_true_class: bool (default false; symmetric only), meta_per_class: int >= 0 (optional:
  the val set is then a balanced meta set of that many clean images per class, held out before
  the noise; not together with ``long_tail``, whose meta set already is)}``.
* ``spurious`` (coloured-MNIST sources only, and required there; :mod:`methods.data.shift`):
  ``{correlation: [0, 1] (required; train), test_correlation: [0, 1] (default 1/C: colour
  independent of the label), val_correlation: [0, 1] (default: test_correlation),
  groups: label_colour | label_aligned (default label_colour)}``; ``correlation`` is the
  probability that an image wears its label's colour.
* ``image_size`` (resizing sources only: ``waterbirds``, ``celeba``): side of the square images
  stored by ``prepare`` (default: the source's ``default_image_size``, 64).

Fields added after the first release (``label_noise.meta_per_class``, ``spurious``,
``image_size``) are left out of :meth:`DatasetSpec.to_dict` when absent, so the manifests and
digests of every spec written before them are unchanged.

Errors are ``ValueError`` naming the dataset, the field and the bad value.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from ..registry import DATASETS
from .shift import GROUPINGS
from .variants import NOISE_KINDS

_TOP = ("source", "val_size", "split_seed", "seed", "long_tail", "label_noise", "spurious", "image_size")
_LONG_TAIL = ("imbalance_factor", "meta_per_class")
_NOISE = ("kind", "rate", "include_true_class", "meta_per_class")
_SPURIOUS = ("correlation", "test_correlation", "val_correlation", "groups")


@dataclass(frozen=True)
class LongTail:
    imbalance_factor: float
    meta_per_class: int = 10


@dataclass(frozen=True)
class LabelNoise:
    kind: str
    rate: float
    include_true_class: bool = False
    meta_per_class: Optional[int] = None    # a clean balanced meta set held out before the noise


@dataclass(frozen=True)
class Spurious:
    """Coloured MNIST's colour-label correlation per split (see :mod:`methods.data.shift`)."""

    correlation: float          # train: P(colour = the label's colour)
    test_correlation: float     # default 1/C: colour independent of the label
    val_correlation: float      # default: test_correlation
    groups: str = "label_colour"


@dataclass(frozen=True)
class DatasetSpec:
    source: str
    val_size: Optional[int]       # None when a meta set or an official val split defines the val set
    split_seed: int = 0
    seed: int = 0
    long_tail: Optional[LongTail] = None
    label_noise: Optional[LabelNoise] = None
    spurious: Optional[Spurious] = None
    image_size: Optional[int] = None

    @property
    def meta_per_class(self) -> Optional[int]:
        """Per-class size of the balanced meta set that is the val set, if the spec asks for one."""
        if self.long_tail is not None:
            return self.long_tail.meta_per_class
        if self.label_noise is not None:
            return self.label_noise.meta_per_class
        return None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for key in ("spurious", "image_size"):      # absent -> left out (see module docstring)
            if d[key] is None:
                del d[key]
        if d["label_noise"] is not None and d["label_noise"]["meta_per_class"] is None:
            del d["label_noise"]["meta_per_class"]
        return d

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

    def probability(self, d: Mapping, key: str, field: str, default: Optional[float] = None) -> float:
        if key not in d and default is not None:
            return default
        v = self.number(d, key, field)
        if not 0.0 <= v <= 1.0:
            raise self.fail(field, d[key], "must be in [0, 1]")
        return v


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
        meta = None
        if ln.get("meta_per_class") is not None:
            if long_tail is not None:
                raise ck.fail("label_noise.meta_per_class", ln["meta_per_class"], "cannot be combined with "
                              "long_tail (long_tail.meta_per_class sets the meta set, held out before both)")
            meta = ck.int_(ln, "meta_per_class", "label_noise.meta_per_class", 0)
        noise = LabelNoise(kind, rate, inc, meta)

    src = DATASETS.get(source)
    spurious = None
    if getattr(src, "spurious_colour", False):
        if d.get("spurious") is None:
            raise ck.fail("spurious", None, f"is required for source {source!r} (e.g. {{correlation: 0.9}})")
        sp = ck.keys(d["spurious"], _SPURIOUS, "spurious")
        test = ck.probability(sp, "test_correlation", "spurious.test_correlation", 1.0 / src.num_classes)
        grouping = sp.get("groups", "label_colour")
        if grouping not in GROUPINGS:
            raise ck.fail("spurious.groups", grouping, f"must be one of {list(GROUPINGS)}")
        spurious = Spurious(correlation=ck.probability(sp, "correlation", "spurious.correlation"),
                            test_correlation=test,
                            val_correlation=ck.probability(sp, "val_correlation", "spurious.val_correlation", test),
                            groups=grouping)
    elif d.get("spurious") is not None:
        raise ck.fail("spurious", d["spurious"], f"applies to coloured-MNIST sources only "
                      f"({[n for n in DATASETS.names() if getattr(DATASETS.get(n), 'spurious_colour', False)]}), "
                      f"not to source {source!r}")

    image_size = None
    if getattr(src, "resizable", False):
        image_size = ck.int_(d, "image_size", "image_size", src.default_image_size, lo=8)
    elif d.get("image_size") is not None:
        raise ck.fail("image_size", d["image_size"], f"applies to resizing sources only "
                      f"({[n for n in DATASETS.names() if getattr(DATASETS.get(n), 'resizable', False)]}), "
                      f"not to source {source!r}")

    meta_set = long_tail is not None or (noise is not None and noise.meta_per_class is not None)
    if getattr(src, "official_val", False):
        if "val_size" in d:
            raise ck.fail("val_size", d["val_size"], f"cannot be set for source {source!r}: its official "
                          "validation split is the val set (a meta set of meta_per_class per class is "
                          "drawn from it when long_tail or label_noise.meta_per_class asks for one)")
        val_size = None
    elif meta_set:
        if "val_size" in d:
            which = "long_tail" if long_tail is not None else "label_noise.meta_per_class"
            raise ck.fail("val_size", d["val_size"], f"cannot be combined with {which} (its meta set "
                          "of meta_per_class per class is the val set)")
        val_size = None
    else:
        val_size = ck.int_(d, "val_size", "val_size", src.default_val_size)
    return DatasetSpec(source=source, val_size=val_size,
                       split_seed=ck.int_(d, "split_seed", "split_seed", 0),
                       seed=ck.int_(d, "seed", "seed", 0), long_tail=long_tail, label_noise=noise,
                       spurious=spurious, image_size=image_size)
