"""GPU-hours a config's matrix is expected to cost, per paper group, and how to run it on a cluster.

::

    python -m methods.gpu_hours --configfile workflow/config/paper.yaml \\
        [--results results] [--markdown out.md] [--select-dir sel/]

**Estimates, not measurements** (until a GPU run exists).  For every cell of the config, expanded
exactly as the Snakefile expands it (:func:`methods.config.iter_cells`, :func:`resolve_cell`,
:func:`resolve_evaluation`; a ``--configfile`` replaces ``workflow/config/default.yaml``, it is
not merged with it):

* **training** forward and backward sample-passes = epochs x examples per epoch x passes per
  example per epoch.  Examples per epoch follow the trainer (``drop_last``, default true:
  ``floor(n / B) x B``; ``max_steps_per_epoch``) from the train split's size: read from the
  prepared ``manifest.json`` under ``<results>/data/<dataset>/`` when one exists for the same
  spec, else computed from :data:`SOURCES` and the dataset spec as ``methods.data.prepare``
  draws it (val hold-out or balanced meta set first, then the long-tail profile
  ``n_c = int(n_max (1/IF)^(c/(C-1)))`` with ``n_max`` the smallest remaining class; label
  noise and colours change no size).  Where a source's per-class train counts are not listed
  (MNIST-5k, Waterbirds, CelebA) they are taken as balanced: an approximation, used only by
  long-tail variants of those sources.
  The passes per example per epoch are **counted** where a finished run measured them: every
  ``train.json`` under ``--results`` records ``passes`` per epoch (hooks count every forward
  and backward sample-pass, ``methods/measure/passes.py``); a cell uses the counts of any
  measured run of the same method whose *cost-relevant* arguments (:data:`COST_KEYS`: PGD
  steps, BB's m, variant, steps and selection, Selective AT's rho, steps, selection rule and
  clean term, ...) are equal, averaged over that run's epochs after its warm-up, on whatever
  dataset and architecture it ran (passes per example do not depend on the architecture; on
  the data only through BB's selected fraction under GS and BG, which a small run then stands
  in for).  Otherwise the method's **analytic** count
  (:func:`analytic_rates`) is used and the row says so; BB's data-dependent selected set (GS,
  BG) is then taken at its upper bound (every copy selected).
* **evaluation** passes per checkpoint (``evaluation.checkpoints``), in forward+backward
  equivalents (a forward alone = 1/3), as ``methods.evaluation.unit_weights`` weighs its
  units: clean 1/3 per example; FGSM / PGD ``runs x steps + runs / 3`` per example (runs =
  restarts, x (C - 1) for ``targeted: all``), every step for every example (early stop
  ignored); AutoAttack on ``min(n, test size)`` examples at the package's budget per example
  (:data:`AUTOATTACK_VERSIONS`, pyautoattack 0.2.0's settings, as
  ``methods.autoattack_adapter.attack_budget`` reads them: standard = APGD-CE 100 + APGD-T
  9 x 100 + FAB-T 9 x 100 + Square 5000 queries / 3; targets capped at C - 1), **assuming
  every example stays robust through every sub-attack: an upper bound** (broken examples
  leave the later sub-attacks); the PGD on the AutoAttack subset; the defences (clean with
  ``samples`` draws, oblivious attacks crafted once on the base model then ``samples`` draws
  per defence, adaptive attacks x ``eot_samples`` against randomized defences, AutoAttack
  ``rand`` x its draws per forward).
* **GPU-seconds** = fwd+bwd-equivalent passes x the architecture's per-pass cost
  (:func:`pass_seconds`): one anchor, :data:`ANCHOR`, scaled by forward multiply-accumulates
  (:data:`ARCH_GMACS`).  The per-epoch training monitor (clean + PGD on a fixed batch) is added
  to the training GPU time.  Where the results hold **measured** GPU-seconds (NVML windows
  ``measurement.records[].gpu_s`` of a ``train.json`` / ``eval_<ckpt>.json`` at the cell's path
  with the same training / evaluation identity) those replace the estimate, and the row says
  ``measured``.

Torch-free (``tests/test_layering.py``): the Snakefile's config layer only.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .config import (REPO_ROOT, SCHEMA_DIR, ConfigError, cell_dir, eval_checkpoints,
                     iter_cells, load_raw_recipes, load_recipes, load_yaml, resolve_cell,
                     resolve_evaluation)
from .config_checks import check_config
from .declared import method_inits
from .defenses.specs import is_randomized

# ============================================================================ stated constants
#: The published anchor.  Wong, Rice, Kolter, "Fast is better than free: revisiting adversarial
#: training", ICLR 2020 (arXiv:2001.03994), Table 1 / section 5.1: FGSM with random start,
#: PreActResNet18, CIFAR-10, 15 epochs with the cyclic learning rate and mixed precision (apex
#: amp O2), 12 minutes on one NVIDIA RTX 2080 Ti.  FGSM-RS is 2 forward + 2 backward sample-
#: passes per training example (one attack step, one training step), so 15 x 50,000 x 2
#: forward+backward passes took 720 s: 0.48 ms per forward+backward of one 32x32 image.
ANCHOR = {
    "source": "Wong, Rice, Kolter 2020 (Fast is better than free, ICLR 2020): FGSM-RS, "
              "PreActResNet18, CIFAR-10, 15 epochs, mixed precision, 12 min on one RTX 2080 Ti",
    "epochs": 15, "train_size": 50_000, "fwd_bwd_per_example": 2, "seconds": 12 * 60,
    "arch": "preactresnet18", "gpu": "RTX 2080 Ti", "precision": "mixed (apex amp O2)",
}
ANCHOR_PASS_SECONDS = ANCHOR["seconds"] / (
    ANCHOR["epochs"] * ANCHOR["train_size"] * ANCHOR["fwd_bwd_per_example"])   # 4.8e-4 s

#: A forward pass without a backward costs this fraction of a forward+backward (the backward
#: is about twice the forward: the usual rule of thumb, also methods.evaluation's weighting).
FORWARD_ONLY = 1.0 / 3.0

#: Forward multiply-accumulates per image, in GMACs (what papers call "FLOPs"), at the image
#: shape of the cells: counted for this package's own definitions (a forward hook on every
#: Conv2d / Linear summing output elements x fan-in, one image through ``methods.models.
#: build_model``), the published figure beside it where one exists.  Keys: :func:`arch_key`,
#: C x H x W.  The per-pass cost scales with these; small nets (ResNet-32, SmallCNN) are not
#: compute-bound on a GPU, so their scaled cost is a lower bound.
ARCH_GMACS: Dict[Tuple[str, str], float] = {
    # PreActResNet18, both variants (final BN or not): published 0.56 (N-FGSM, locuslab)
    ("preactresnet18", "3x32x32"): 0.5554,
    # WRN-28-10: published 5.25 (Zagoruyko & Komodakis 2016), the bearpaw coding (stride in the
    # first conv of a block); meliketoy's coding strides the second conv, so each downsampling
    # block's first conv runs at the higher resolution: 5.95
    ("wrn-28-10", "3x32x32"): 5.9511,
    ("wrn-28-10", "1x28x28"): 4.5561,
    ("wrn-28-10-bearpaw", "3x32x32"): 5.2434,
    # Selective AT's ResNet-18 (kuangliu ResNet18): published 0.56
    ("resnet18_sat", "3x32x32"): 0.5554,
    # CIFAR ResNet-32 (He et al. 2016; LDAM / Meta-Weight-Net): published 0.07
    ("resnet32", "3x32x32"): 0.0689,
    # VGG19-BN for 32x32 inputs (the BatchOut extension's), untied and weight-tied: ~0.40
    ("vgg19_bn", "3x32x32"): 0.3981,
    ("vgg19_bn-tied", "3x32x32"): 0.3981,
    # SmallCNN (Selective AT's MNISTNet shape), width 1 and 0.5
    ("smallcnn", "1x28x28"): 0.0120,
    ("smallcnn", "3x28x28"): 0.0124,
    ("smallcnn-w0.5", "1x28x28"): 0.0030,
    ("smallcnn-w0.5", "3x28x28"): 0.0032,
}

#: Every dataset source: train pool, official val split (None: none), test, classes, default
#: ``val_size``, image shape, and the per-class counts of the train pool where they are known
#: (torchvision's MNIST and SVHN: class 0 first; CIFAR: 5,000 each).
SOURCES: Dict[str, Dict[str, Any]] = {
    "cifar10": {"train": 50_000, "val": None, "test": 10_000, "classes": 10, "default_val": 1000,
                "shape": "3x32x32", "per_class": [5000] * 10},
    "cifar100": {"train": 50_000, "val": None, "test": 10_000, "classes": 100, "default_val": 1000,
                 "shape": "3x32x32", "per_class": [500] * 100},
    "svhn": {"train": 73_257, "val": None, "test": 26_032, "classes": 10, "default_val": 1000,
             "shape": "3x32x32",
             "per_class": [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659]},
    "mnist": {"train": 60_000, "val": None, "test": 10_000, "classes": 10, "default_val": 1000,
              "shape": "1x28x28",
              "per_class": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]},
    "cmnist": {"train": 60_000, "val": None, "test": 10_000, "classes": 10, "default_val": 1000,
               "shape": "3x28x28",
               "per_class": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]},
    "mnist5k": {"train": 4_000, "val": None, "test": 1_000, "classes": 10, "default_val": 500,
                "shape": "1x28x28", "per_class": None},
    "cmnist5k": {"train": 4_000, "val": None, "test": 1_000, "classes": 10, "default_val": 500,
                 "shape": "3x28x28", "per_class": None},
    "waterbirds": {"train": 4_795, "val": 1_199, "test": 5_794, "classes": 2, "default_val": None,
                   "shape": None, "per_class": None},
    "celeba": {"train": 162_770, "val": 19_867, "test": 19_962, "classes": 2, "default_val": None,
               "shape": None, "per_class": None},
}
DEFAULT_IMAGE_SIZE = 64        # Waterbirds / CelebA without image_size (methods.data.group_sources)

#: AutoAttack budgets per example, in forward+backward passes (Square's queries are forwards:
#: 1/3), pyautoattack 0.2.0 ``AutoAttack.__init__`` and ``_set_version`` for Linf / L2, as
#: ``methods.autoattack_adapter.attack_budget`` reads them: (iterations, restarts, targets,
#: eot) per sub-attack; ``targets`` is capped at C - 1 below.
AUTOATTACK_VERSIONS: Dict[str, Dict[str, Tuple[int, int, int, int]]] = {
    "standard": {"apgd-ce": (100, 1, 1, 1), "apgd-t": (100, 1, 9, 1), "fab-t": (100, 1, 9, 1),
                 "square": (5000, 1, 1, 1)},
    "plus": {"apgd-ce": (100, 5, 1, 1), "apgd-dlr": (100, 5, 1, 1), "fab": (100, 5, 1, 1),
             "square": (5000, 1, 1, 1), "apgd-t": (100, 1, 9, 1), "fab-t": (100, 1, 9, 1)},
    "rand": {"apgd-ce": (100, 1, 1, 20), "apgd-dlr": (100, 1, 1, 20)},
}
#: ``custom``: the listed attacks with the package's constructor settings (no _set_version).
AUTOATTACK_CUSTOM = {"apgd-ce": (100, 5, 1, 1), "apgd-dlr": (100, 5, 1, 1), "fab": (100, 5, 1, 1),
                     "square": (5000, 1, 1, 1), "apgd-t": (100, 1, 9, 1), "fab-t": (100, 1, 9, 1)}

#: The method arguments that change a method's passes per example (the rest, e.g. eps, alpha,
#: mixing, selection *mode*, only change the numbers computed).  A measured count is used for a
#: cell only if these are equal (defaults filled from the method's declared parameters).  Warm-up
#: lengths (Selective AT's ``warmup_epochs``, BB's ``clean_warmup_epochs``) are not in the key:
#: a measured run's warm-up and later epochs are averaged apart (:func:`warm_epochs`) and
#: weighted by the cell's own warm-up.
COST_KEYS: Dict[str, Tuple[str, ...]] = {
    "standard": (), "fgsm_rs": (), "nfgsm": (), "mixup": (), "manifold_mixup": (),
    "batchout": (), "isda": (), "iada": (),
    "pgd_at": ("steps",),
    "bb": ("m", "variant", "steps", "selection"),
    "selective": ("selection", "rho", "steps", "clean_term", "skip_zero_clean_term",
                  "lambda_clean"),
    "iat": ("steps", "attack_labels"),
    "layerwise_at": ("schedule", "combine_pgd", "steps", "clean_weight"),
    "meta_iada": ("meta_interval", "meta_batch_size"),
}

HOUR = 3600.0


# ============================================================================ the config
def load_config_dict(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``config`` as the Snakefile sees it: checked
    (:func:`methods.config_checks.check_config`) and validated with Snakemake's ``validate``,
    which fills the schema's defaults, so the training and evaluation identities (and their
    hashes) are the Snakefile's."""
    from snakemake.utils import validate     # torch-free; what the Snakefile calls

    config = json.loads(json.dumps(config))
    check_config(config)
    validate(config, str(SCHEMA_DIR / "config.schema.yaml"))
    return config


def load_config(path: Path) -> Dict[str, Any]:
    """The workflow config file alone (a ``--configfile`` replaces the embedded default, it is
    not merged with it), as the Snakefile sees it (:func:`load_config_dict`)."""
    return load_config_dict(load_yaml(Path(path)))


# ============================================================================ architectures
def arch_key(arch: Mapping[str, Any]) -> str:
    """The :data:`ARCH_GMACS` key of an ``archs`` entry (the arguments that change its MACs)."""
    model = arch.get("model", arch.get("name"))
    if model == "wrn":
        variant = arch.get("variant", "meliketoy")
        return (f"wrn-{arch.get('depth', 28)}-{arch.get('widen_factor', 10)}"
                + ("" if variant == "meliketoy" else f"-{variant}"))
    if model == "vgg19_bn" and arch.get("tied"):
        return "vgg19_bn-tied"
    width = arch.get("width")
    if width not in (None, 1, 1.0):
        return f"{model}-w{width:g}"
    return str(model)


def image_shape(source: str, spec: Mapping[str, Any]) -> str:
    src = SOURCES[source]
    if src["shape"] is not None:
        return src["shape"]
    size = int(spec.get("image_size", DEFAULT_IMAGE_SIZE))
    return f"3x{size}x{size}"


def _pixels(shape: str) -> int:
    h, w = (int(v) for v in shape.split("x")[1:])
    return h * w


def arch_gmacs(arch: Mapping[str, Any], shape: str) -> Tuple[float, str]:
    """GMACs per image and how they were obtained (listed, or scaled from 32x32 by pixels)."""
    key = arch_key(arch)
    if (key, shape) in ARCH_GMACS:
        return ARCH_GMACS[(key, shape)], "listed"
    same = [(s, g) for (k, s), g in ARCH_GMACS.items() if k == key]
    if not same:
        raise ConfigError(f"methods.gpu_hours: no MAC count for architecture {key!r}; add it to "
                          f"ARCH_GMACS (known: {sorted({k for k, _ in ARCH_GMACS})})")
    s, g = same[0]
    return g * _pixels(shape) / _pixels(s), f"scaled from {s} by pixel count"


def pass_seconds(arch: Mapping[str, Any], shape: str) -> float:
    """GPU-seconds of one forward+backward of one image: the anchor scaled by MACs."""
    anchor = ARCH_GMACS[(ANCHOR["arch"], "3x32x32")]
    return ANCHOR_PASS_SECONDS * arch_gmacs(arch, shape)[0] / anchor


def anchor_check_hours(epochs: int = 15, train_size: int = 50_000) -> float:
    """The anchor's own arithmetic: FGSM-RS (2+2) on PreActResNet18 at 32x32."""
    fb = epochs * train_size * 2
    return fb * pass_seconds({"model": "preactresnet18"}, "3x32x32") / HOUR


# ============================================================================ dataset sizes
def long_tail_counts(n_max: int, classes: int, imbalance_factor: float) -> List[int]:
    """methods.data.variants.long_tail_counts (restated here: that module imports torch)."""
    mu = 1.0 / float(imbalance_factor)
    return [int(n_max * mu ** (c / (classes - 1.0))) for c in range(classes)]


@dataclass
class DatasetSize:
    train: int
    test: int
    classes: int
    shape: str
    how: str


def _manifest_matches(manifest: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    written = manifest.get("spec") or {}

    def same(a, b):
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            return all(same(v, b.get(k)) for k, v in a.items())
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
                and not isinstance(a, bool) and not isinstance(b, bool):
            return float(a) == float(b)
        return a == b
    return same(dict(spec), written)


def dataset_size(name: str, spec: Mapping[str, Any],
                 results: Sequence[Path] = ()) -> DatasetSize:
    """Train / test size of one ``datasets`` entry: from a prepared manifest if one exists for
    the same spec, else computed as ``methods.data.prepare`` draws it."""
    source = spec["source"]
    if source not in SOURCES:
        raise ConfigError(f"methods.gpu_hours: dataset {name!r}: source {source!r} has no size "
                          f"listed in SOURCES (known: {sorted(SOURCES)})")
    src = SOURCES[source]
    shape = image_shape(source, spec)
    for root in results:
        path = Path(root) / "data" / name / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _manifest_matches(manifest, spec):
            splits = manifest["splits"]
            return DatasetSize(int(splits["train"]["size"]), int(splits["test"]["size"]),
                               src["classes"], shape, f"prepared manifest {path}")
    c = src["classes"]
    pool = list(src["per_class"]) if src["per_class"] else [src["train"] / c] * c
    how = "listed source sizes" + ("" if src["per_class"] else " (classes taken as balanced)")
    lt = spec.get("long_tail")
    noise = spec.get("label_noise") or {}
    meta = (lt or {}).get("meta_per_class", 10) if lt else noise.get("meta_per_class")
    if src["val"] is not None:                 # official val split: train is the official train
        rest = pool
    elif meta is not None:                     # balanced meta set of `meta` per class first
        rest = [n - meta for n in pool]
    else:
        val = spec.get("val_size", src["default_val"])
        rest = [n * (1 - val / src["train"]) for n in pool]
    if lt:
        n_max = int(min(rest))
        train = sum(long_tail_counts(n_max, c, lt["imbalance_factor"]))
        how += f", long tail {lt['imbalance_factor']:g} (n_max {n_max})"
    else:
        train = int(round(sum(rest)))
    return DatasetSize(int(train), src["test"], c, shape, how)


# ============================================================================ method arguments
def _literal(node: Optional[ast.expr]) -> Any:
    """A default value from the source: constants, tuples / lists and arithmetic on them."""
    if node is None:
        return None
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _literal(node.left), _literal(node.right)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b}
        if type(node.op) in ops and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return ops[type(node.op)]()
    return None


@functools.lru_cache(maxsize=None)
def method_defaults() -> Dict[str, Dict[str, Any]]:
    """``{method: {parameter: default}}`` of every registered method, read from the source of
    ``methods/algorithms`` with :mod:`ast` (:func:`methods.declared.method_inits`)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, init in method_inits().items():
        args = init.args if init is not None else None
        out[name] = ({a.arg: _literal(d) for a, d in zip(args.kwonlyargs, args.kw_defaults)
                      if a.arg != "threat"} if args is not None else {})
    return out


def full_args(method: str, args: Mapping[str, Any]) -> Dict[str, Any]:
    """A method's arguments with its declared defaults filled in (and BB's derived steps)."""
    full = {**method_defaults().get(method, {}), **dict(args)}
    if method == "bb" and full.get("steps") is None:
        full["steps"] = 1 if full.get("variant", "single") == "single" else 10
    return full


def cost_key(method: str, args: Mapping[str, Any]) -> Tuple[str, str]:
    full = full_args(method, args)
    keys = COST_KEYS.get(method)
    if keys is None:
        return method, "?"
    values = {k: full.get(k) for k in keys}
    if method == "selective" and not full.get("skip_zero_clean_term"):
        values.pop("lambda_clean")           # only matters when a zero clean term is skipped
    if method == "layerwise_at":
        if not full.get("combine_pgd"):
            values.pop("steps")
        values["clean_weight"] = bool(full.get("clean_weight"))
    return method, json.dumps(values, sort_keys=True, default=str)


# ============================================================================ training passes
@dataclass
class Rates:
    """Passes per example per epoch: ``warm`` for the first ``warm_epochs`` epochs (a method's
    warm-up), ``steady`` after them; each (forward, backward)."""

    warm: Tuple[float, float]
    steady: Tuple[float, float]
    warm_epochs: int


def warm_epochs(method: str, args: Mapping[str, Any]) -> int:
    full = full_args(method, args)
    if method == "selective" and full.get("selection") != "random":
        return int(full.get("warmup_epochs") or 0)
    if method == "bb":
        return int(full.get("clean_warmup_epochs") or 0)
    return 0


def analytic_rates(method: str, args: Mapping[str, Any], batch_size: int,
                   steps_per_epoch: int) -> Tuple[Rates, str]:
    """Each method's passes per training example per epoch, from its code (``methods/
    algorithms``; the tests in ``tests/test_passes.py`` and the methods' own tests check the
    counts), and a note on anything assumed."""
    a = full_args(method, args)
    w = warm_epochs(method, args)
    note = ""
    if method in ("standard", "mixup", "manifold_mixup", "batchout", "isda", "iada"):
        steady = (1.0, 1.0)
    elif method in ("fgsm_rs", "nfgsm"):
        steady = (2.0, 2.0)                              # one attack step + the training step
    elif method == "pgd_at":
        k = int(a["steps"])
        steady = (k + 1.0, k + 1.0)
    elif method == "bb":
        m, k, sel = int(a["m"]), int(a["steps"]), a.get("selection", "gs")
        select_fwd = {"none": 0, "gs": m, "cp": m, "bg": m + 1}[sel]
        trained = {"none": m, "gs": m, "cp": 1, "bg": m + 1}[sel]
        steady = (m * k + select_fwd + trained, m * k + trained)
        if sel in ("gs", "bg"):
            note = f"BB-{sel.upper()}: every copy taken as selected (upper bound)"
        return Rates((1.0, 1.0), steady, w), note
    elif method == "selective":
        r = int(batch_size * float(a["rho"])) / float(batch_size)
        k = int(a["steps"])
        clean = 1.0 if a.get("clean_term", True) and not (
            a.get("skip_zero_clean_term") and float(a.get("lambda_clean", 0.2)) == 0) else 0.0
        base = r * k + r + clean
        select = 0.0 if a.get("selection") == "random" else 1.0
        return Rates((base, base), (base + select, base), w), note
    elif method == "iat":
        k = int(a["steps"])
        extra = 1.0 if a.get("attack_labels") == "predicted" else 0.0
        steady = (k + 2.0 + extra, k + 2.0)              # PGD, then the clean and the adv half
    elif method == "layerwise_at":
        attack = (int(a["steps"]) if a.get("combine_pgd") else 0) + (
            1 if a.get("schedule", "same_batch") == "same_batch" else 0)
        train = 1 + (1 if float(a.get("clean_weight") or 0) > 0 else 0)
        steady = (float(attack + train),) * 2
    elif method == "meta_iada":
        interval, meta_b = int(a["meta_interval"]), int(a["meta_batch_size"])
        meta_steps = steps_per_epoch // interval
        per_example = meta_steps * (batch_size + meta_b) / float(steps_per_epoch * batch_size)
        steady = (1.0 + per_example,) * 2
        note = ("Meta-IADA: the look-ahead's second-order backward (about one more backward "
                "over B rows per meta step) is not booked, as in the counted passes")
    else:
        steady = (1.0, 1.0)
        note = f"method {method!r} has no analytic count here: 1+1 assumed"
    return Rates(steady, steady, w), note


@dataclass
class MeasuredPasses:
    warm: Optional[Tuple[float, float]]
    steady: Optional[Tuple[float, float]]
    sources: List[str] = field(default_factory=list)


def _method_args_of(record: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    method = record["cell"]["method"]
    described = {k: v for k, v in (record.get("method") or {}).items()
                 if k not in ("name", "paper", "threat")}
    return method, {**(record["cell"].get("method_args") or {}), **described}


def measured_pass_index(results: Sequence[Path]) -> Dict[Tuple[str, str], MeasuredPasses]:
    """Per (method, cost key): passes per example per epoch over the measured runs' warm-up and
    post-warm-up epochs, pooled over every ``train.json`` under the results directories."""
    pooled: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for root in results:
        for path in sorted(Path(root).rglob("train.json")):
            try:
                record = json.loads(path.read_text())
                method, args = _method_args_of(record)
                history = record["history"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            key = cost_key(method, args)
            w = warm_epochs(method, args)
            acc = pooled.setdefault(key, {"warm": [0.0, 0.0, 0], "steady": [0.0, 0.0, 0],
                                          "sources": []})
            used = False
            for h in history:
                examples = int(h.get("examples") or 0)
                if not examples or not isinstance(h.get("passes"), Mapping):
                    continue
                fwd = sum(p["forward"] for p in h["passes"].values())
                bwd = sum(p["backward"] for p in h["passes"].values())
                slot = acc["warm" if int(h["epoch"]) < w else "steady"]
                slot[0] += fwd
                slot[1] += bwd
                slot[2] += examples
                used = True
            if used:
                acc["sources"].append(str(path))
    out = {}
    for key, acc in pooled.items():
        rate = {k: ((acc[k][0] / acc[k][2], acc[k][1] / acc[k][2]) if acc[k][2] else None)
                for k in ("warm", "steady")}
        if rate["steady"] is not None or rate["warm"] is not None:
            out[key] = MeasuredPasses(rate["warm"], rate["steady"], acc["sources"])
    return out


def examples_per_epoch(train_size: int, train: Mapping[str, Any]) -> Tuple[int, int]:
    """(examples, steps) per epoch as the trainer's loader gives them."""
    b = int(train["batch_size"])
    drop_last = bool(train.get("drop_last", True))
    steps = train_size // b if drop_last else math.ceil(train_size / b)
    if train.get("max_steps_per_epoch"):
        steps = min(steps, int(train["max_steps_per_epoch"]))
    examples = min(steps * b, train_size)
    return examples, max(1, steps)


def training_passes(cell: Mapping[str, Any], train_size: int,
                    measured: Mapping[Tuple[str, str], MeasuredPasses]
                    ) -> Tuple[float, float, str, str]:
    """(forward, backward) sample-passes of a cell's whole training, ``counted`` or
    ``analytic``, and a note."""
    train = cell["train"]
    epochs = int(train["epochs"])
    examples, steps = examples_per_epoch(train_size, train)
    method, args = cell["method"], cell.get("method_args") or {}
    rates, note = analytic_rates(method, args, int(train["batch_size"]), steps)
    hit = measured.get(cost_key(method, args))
    source = "analytic"
    warm, steady = rates.warm, rates.steady
    w = min(rates.warm_epochs, epochs)
    if hit is not None and (hit.steady is not None or w == epochs):
        steady = hit.steady or steady
        warm = hit.warm or warm
        source = "counted"
        note = ""
    fwd = examples * (w * warm[0] + (epochs - w) * steady[0])
    bwd = examples * (w * warm[1] + (epochs - w) * steady[1])
    return fwd, bwd, source, note


def monitor_passes(cell: Mapping[str, Any]) -> float:
    """Per-epoch monitor (methods.training.build_monitor): clean + PGD on ``n`` images."""
    mon = cell["train"].get("monitor") or {}
    n, steps = int(mon.get("n", 256)), int(mon.get("steps", 10))
    return int(cell["train"]["epochs"]) * n * (steps + 2 * FORWARD_ONLY)


def fb_equivalent(fwd: float, bwd: float) -> float:
    """Forward+backward equivalents: each backward with its forward, the other forwards 1/3."""
    return bwd + (fwd - bwd) * FORWARD_ONLY


# ============================================================================ evaluation passes
def attack_passes(spec: Mapping[str, Any], classes: int) -> float:
    """As ``methods.evaluation.attack_passes``: runs x steps + runs / 3 per example."""
    runs = int(spec.get("restarts", 1)) * (classes - 1 if spec.get("targeted") == "all" else 1)
    steps = int(spec.get("steps", 1)) if spec["name"] != "fgsm" else 1
    return float(runs * steps + runs * FORWARD_ONLY)


def autoattack_budget(spec: Mapping[str, Any], classes: int,
                      iterations: Optional[int] = None, eot_iter: Optional[int] = None,
                      robust_fraction: float = 1.0) -> float:
    """Forward+backward passes per example of one AutoAttack run: every example through the first
    sub-attack, and ``robust_fraction`` of them (1: all, the upper bound) through the others."""
    version = spec.get("version", "standard")
    if version == "custom":
        table = {a: AUTOATTACK_CUSTOM[a] for a in spec.get("attacks") or []}
    else:
        table = AUTOATTACK_VERSIONS[version]
    total = 0.0
    for i, (attack, (iters, restarts, targets, eot)) in enumerate(table.items()):
        share = 1.0 if i == 0 else float(robust_fraction)
        targets = min(targets, max(1, classes - 1))
        if attack == "square":
            total += share * iters * restarts * FORWARD_ONLY
            continue
        if attack.startswith("apgd"):
            iters = iterations or iters
            eot = eot_iter or eot
        total += share * iters * restarts * targets * (eot if attack.startswith("apgd") else 1)
    return total


def evaluation_passes(evaluation: Mapping[str, Any], test_size: int, classes: int,
                      robust_fraction: float = 1.0) -> float:
    """Forward+backward equivalents of one evaluation of one checkpoint (module docstring);
    ``robust_fraction``: of the AutoAttack examples, the share left for the sub-attacks after
    the first (1: all of them, the upper bound)."""
    n = min(int(evaluation.get("n") or test_size), test_size)
    total = n * FORWARD_ONLY                                             # clean
    total += sum(n * attack_passes(s, classes) for s in evaluation.get("attacks") or [])
    aa = evaluation.get("autoattack")
    aa_on = bool(aa and aa.get("enabled", True))
    n_aa = min(int((aa or {}).get("n", 1000)), test_size)
    if aa_on:
        total += n_aa * autoattack_budget(aa, classes, robust_fraction=robust_fraction)
        if aa.get("compare_pgd"):
            total += n_aa * attack_passes(aa["compare_pgd"], classes)
    defenses = evaluation.get("defenses") or []
    if defenses:
        draws = [float(d.get("samples") or (d.get("samples_pl", 0) + d.get("samples_ol", 0)) or 1)
                 for d in defenses]
        randomized = [is_randomized(d) for d in defenses]
        total += n * sum(draws) * FORWARD_ONLY
        for entry in evaluation.get("defense_attacks") or []:
            passes = attack_passes(entry, classes)
            modes = entry.get("modes") or ("oblivious", "adaptive")
            if "oblivious" in modes:
                total += n * (passes + sum(draws) * FORWARD_ONLY)
            if "adaptive" in modes:
                total += sum(n * (passes * (int(entry.get("eot_samples") or 20) if r else 1)
                                  + d * FORWARD_ONLY) for d, r in zip(draws, randomized))
        daa = evaluation.get("defense_autoattack")
        if daa and daa.get("enabled", True) and any(randomized):
            n_daa = min(int(daa.get("n") or (aa or {}).get("n") or 1000), test_size)
            spec = {"version": daa.get("version") or "rand", "attacks": daa.get("attacks")}
            budget = autoattack_budget(spec, classes, daa.get("iterations"), daa.get("eot_iter"),
                                       robust_fraction)
            total += sum(n_daa * budget * float(daa.get("draws") or d)
                         for d, r in zip(draws, randomized) if r)
    return total


# ============================================================================ measured GPU time
def _top_level_gpu_seconds(records: Iterable[Mapping[str, Any]]) -> Optional[float]:
    """Sum of ``gpu_s`` over the windows no other listed window contains; None if any is null."""
    records = [r for r in records if isinstance(r, Mapping) and "path" in r]
    paths = {r["path"] for r in records}
    top = [r for r in records
           if not any(r["path"].startswith(p + "/") for p in paths if p != r["path"])]
    if not top or any(r.get("gpu_s") is None for r in top):
        return None
    return float(sum(r["gpu_s"] for r in top))


def measured_gpu_seconds(record: Mapping[str, Any]) -> Optional[float]:
    """A job's GPU-seconds: this session's windows plus earlier sessions' (resumed jobs)."""
    m = record.get("measurement") or {}
    now = _top_level_gpu_seconds(m.get("records") or [])
    if now is None:
        return None
    before = m.get("previous_sessions") or []
    earlier = _top_level_gpu_seconds(before) if before else 0.0
    return None if earlier is None else now + earlier


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def measured_cell_seconds(results: Sequence[Path], cell: Sequence[Any], train_hash: str,
                          eval_hash: str, checkpoints: Sequence[str]
                          ) -> Tuple[Optional[float], Optional[float]]:
    """(training GPU-s, evaluation GPU-s over every checkpoint) measured for this exact cell,
    each None unless the results hold it under the same identities."""
    train_s = eval_s = None
    for root in results:
        base = Path(cell_dir(str(root), *cell))
        rec = _read_json(base / "train.json")
        if train_s is None and rec and (rec.get("cell") or {}).get("train_hash") == train_hash:
            train_s = measured_gpu_seconds(rec)
        if eval_s is None:
            total = 0.0
            for ckpt in checkpoints:
                ev = _read_json(base / f"eval_{ckpt}.json")
                ok = (ev and (ev.get("evaluation") or {}).get("eval_hash") == eval_hash
                      and (ev.get("cell") or {}).get("train_hash") == train_hash)
                s = measured_gpu_seconds(ev) if ok else None
                if s is None:
                    total = None
                    break
                total += s
            eval_s = total
    return train_s, eval_s


# ============================================================================ the estimate
@dataclass
class CellEstimate:
    cell: Tuple[str, str, str, str, int]
    group: str
    paper: str
    epochs: int
    train_size: int
    train_fwd: float
    train_bwd: float
    eval_fb: float
    pass_s: float
    train_s: float
    eval_s: float
    train_source: str          # measured / counted / analytic
    eval_source: str           # measured / estimated
    note: str
    amp: str

    @property
    def source(self) -> str:
        if self.train_source == "measured" and self.eval_source == "measured":
            return "measured"
        return self.train_source if self.train_source != "measured" else "measured (train)"

    @property
    def gpu_hours(self) -> float:
        return (self.train_s + self.eval_s) / HOUR


def recipe_groups(config: Mapping[str, Any]) -> Dict[str, str]:
    """Each recipe (sweep variants included) -> its family: the stem of the recipe file that
    defines it (``baselines``, ``bb``, ...; ``config`` for inline recipes)."""
    raw, origin = load_raw_recipes(config)
    recipes = load_recipes(config)
    out = {}
    for name in recipes:
        base = max((r for r in raw if name == r or name.startswith(r + "-")), key=len,
                   default=name)
        where = origin.get(base, "config.recipes")
        out[name] = "config" if where == "config.recipes" else Path(where).stem
    return out


def estimate(config: Mapping[str, Any], results: Sequence[Path],
             robust_fraction: float = 1.0) -> List[CellEstimate]:
    """One :class:`CellEstimate` per cell, in the Snakefile's order; ``config`` as
    :func:`load_config` returns it."""
    recipes = load_recipes(config)
    groups = recipe_groups(config)
    measured = measured_pass_index(results)
    checkpoints = eval_checkpoints(config)
    sizes: Dict[str, DatasetSize] = {}
    out = []
    for cell in iter_cells(config):
        dataset, arch, method, recipe, seed = cell
        if dataset not in sizes:
            sizes[dataset] = dataset_size(dataset, config["datasets"][dataset], results)
        size = sizes[dataset]
        resolved = resolve_cell(config, dataset, arch, recipe, seed, recipes)
        evaluation = resolve_evaluation(config, recipe, recipes)
        fwd, bwd, source, note = training_passes(resolved, size.train, measured)
        per_pass = pass_seconds(resolved["arch"], size.shape)
        eval_fb = evaluation_passes(evaluation, size.test, size.classes,
                                    robust_fraction) * len(checkpoints)
        train_s = (fb_equivalent(fwd, bwd) + monitor_passes(resolved)) * per_pass
        eval_s = eval_fb * per_pass
        m_train, m_eval = measured_cell_seconds(results, cell, resolved["train_hash"],
                                                evaluation["eval_hash"], checkpoints)
        eval_source = "estimated"
        if m_train is not None:
            train_s, source = m_train, "measured"
        if m_eval is not None:
            eval_s, eval_source = m_eval, "measured"
        out.append(CellEstimate(cell, groups.get(recipe, "config"),
                                recipes[recipe].get("paper", ""), int(resolved["train"]["epochs"]),
                                size.train, fwd, bwd, eval_fb, per_pass, train_s, eval_s, source,
                                eval_source, note, str(resolved["runtime"].get("amp") or "fp32")))
    return out


# ============================================================================ rendering
def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_hours(h: float) -> str:
    if h >= 10:
        return f"{h:,.1f}"
    return f"{h:.2f}" if h >= 0.1 or h == 0 else f"{h:.2g}"


def _sources(rows: Sequence[CellEstimate]) -> str:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r.source] = counts.get(r.source, 0) + 1
    order = ["measured", "measured (train)", "counted", "analytic"]
    return ", ".join(f"{k} {counts[k]}" for k in order if k in counts)


def group_commands(config: Mapping[str, Any], group: str,
                   rows: Sequence[CellEstimate]) -> Dict[str, Any]:
    """The overlay config selecting one group's cells (the config's ``cells`` entries cut to the
    group's recipes, same datasets, archs and seeds, so exactly the group's cells) and its
    target paths."""
    names = {r.cell[3] for r in rows}
    cells = []
    for entry in config.get("cells", []):
        keep = [r for r in entry["recipes"] if r in names]
        if keep:
            cells.append({"datasets": list(entry["datasets"]), "archs": list(entry["archs"]),
                          "recipes": keep, "seeds": [int(s) for s in entry["seeds"]]})
    run_name = f"{config.get('run_name', 'run')}-{group}"
    results = config.get("results_dir", "results")
    targets = [f"{cell_dir(results, *r.cell)}/eval_{ckpt}.json"
               for r in rows for ckpt in eval_checkpoints(config)]
    return {"overlay": {"run_name": run_name, "cells": cells}, "targets": targets,
            "run_name": run_name}


def profile_runtime_minutes(profile: Path = REPO_ROOT / "workflow/profiles/slurm/config.yaml"
                            ) -> Optional[float]:
    try:
        prof = load_yaml(profile)
    except ConfigError:
        return None
    runtime = (prof.get("default-resources") or {}).get("runtime")
    return float(runtime) if runtime is not None else None


def render_markdown(config_path: str, config: Mapping[str, Any], rows: Sequence[CellEstimate],
                    select_dir: Optional[str] = None, robust_fraction: float = 1.0) -> str:
    groups: Dict[str, List[CellEstimate]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    name = config.get("run_name", Path(config_path).stem)
    lines = [f"### GPU-hours: `{config_path}` (run `{name}`, {len(rows)} cells)", "",
             "Estimates (see `methods/gpu_hours.py`): training fwd / bwd sample-passes = epochs x "
             "examples per epoch x passes per example (counted from measured runs where the "
             "cost-relevant method arguments match, else analytic); evaluation in fwd+bwd "
             "equivalents (forward alone = 1/3) over "
             f"{', '.join(eval_checkpoints(config))} checkpoint(s), "
             + ("AutoAttack at its full budget for every example (upper bound)"
                if robust_fraction >= 1 else
                f"AutoAttack with {robust_fraction:g} of its examples left after its first "
                "sub-attack") + "; GPU-hours at "
             f"{ANCHOR_PASS_SECONDS * 1e3:.2f} ms per fwd+bwd of a PreActResNet18 32x32 image "
             f"({ANCHOR['source']}), scaled by forward MACs.", "",
             "| paper group | cells | training passes (fwd / bwd) "
             "| evaluation passes (fwd+bwd eq.) "
             "| GPU-hours (train + eval) | largest cell (h) | source |",
             "|---|---|---|---|---|---|---|"]
    tot = {"n": 0, "f": 0.0, "b": 0.0, "e": 0.0, "tr": 0.0, "ev": 0.0}
    for group in sorted(groups):
        g = groups[group]
        f, b = sum(r.train_fwd for r in g), sum(r.train_bwd for r in g)
        e = sum(r.eval_fb for r in g)
        tr, ev = sum(r.train_s for r in g) / HOUR, sum(r.eval_s for r in g) / HOUR
        biggest = max(g, key=lambda r: r.gpu_hours)
        lines.append(f"| {group} | {len(g)} | {_fmt_count(f)} / {_fmt_count(b)} | {_fmt_count(e)} "
                     f"| **{_fmt_hours(tr + ev)}** ({_fmt_hours(tr)} + {_fmt_hours(ev)}) "
                     f"| {_fmt_hours(biggest.gpu_hours)} | {_sources(g)} |")
        for k, v in (("n", len(g)), ("f", f), ("b", b), ("e", e), ("tr", tr), ("ev", ev)):
            tot[k] += v
    lines.append(f"| **total** | {tot['n']} | {_fmt_count(tot['f'])} / {_fmt_count(tot['b'])} "
                 f"| {_fmt_count(tot['e'])} | **{_fmt_hours(tot['tr'] + tot['ev'])}** "
                 f"({_fmt_hours(tot['tr'])} + {_fmt_hours(tot['ev'])}) "
                 f"| {_fmt_hours(max(r.gpu_hours for r in rows))} | {_sources(rows)} |")
    lines.append("")
    papers = {}
    for r in rows:
        papers.setdefault(r.group, set()).add(r.paper.split(" (")[0].split(";")[0].strip())
    lines.append("Paper groups are the recipe files (`workflow/config/papers/<group>.yaml`): "
                 + "; ".join(f"`{g}`: {', '.join(sorted(p for p in papers[g] if p))}"
                             for g in sorted(papers)) + ".")
    lines.append("")
    runtime = profile_runtime_minutes()
    if runtime:
        long_train = [r for r in rows if r.train_s / 60 > runtime]
        if long_train:
            worst = max(long_train, key=lambda r: r.train_s)
            lines.append(f"{len(long_train)} cells' training is estimated above the slurm "
                         f"profile's runtime ({runtime:.0f} min per job; longest: "
                         f"`{'/'.join(map(str, worst.cell))}`, {worst.train_s / HOUR:.1f} h): "
                         "raise "
                         "it for them, e.g. `--set-resources train:runtime=<minutes>` "
                         "(training resumes after the last finished epoch if a job is killed).")
            lines.append("")
    amps = sorted({r.amp for r in rows})
    if amps != ["fp16"] and amps != ["bf16"]:
        lines.append(f"Precision: the cells run `amp: {'/'.join(amps)}`; the anchor was timed with "
                     "mixed precision, so fp32 cells can take longer than estimated on GPUs with "
                     "tensor cores (set `--config amp=bf16` or `fp16` to run as the anchor).")
        lines.append("")
    notes = sorted({r.note for r in rows if r.note})
    if notes:
        lines.append("Analytic assumptions: " + "; ".join(notes) + ".")
        lines.append("")
    lines += ["Run one group on a SLURM cluster (the overlay's `cells` replace the config's, "
              "`run_name` keeps its tables apart; `snakemake -n` with the same arguments lists "
              "its jobs):", "", "```bash"]
    sel = select_dir or "<select-dir>"
    for group in sorted(groups):
        cmd = group_commands(config, group, groups[group])
        lines.append(f".venv/bin/snakemake --profile workflow/profiles/slurm --configfile "
                     f"{config_path} {sel}/{cmd['run_name']}.yaml")
    lines += ["```", "",
              "or ask for its outputs by path (no tables): "
              f"`.venv/bin/snakemake --profile workflow/profiles/slurm --configfile {config_path} "
              f"$(cat {sel}/<run>-<group>.targets)`; the whole matrix: "
              "`.venv/bin/snakemake --profile workflow/profiles/slurm --configfile "
              f"{config_path}`.",
              ""]
    return "\n".join(lines)


def write_selection(select_dir: Path, config_path: str, config: Mapping[str, Any],
                    rows: Sequence[CellEstimate]) -> List[Path]:
    select_dir.mkdir(parents=True, exist_ok=True)
    groups: Dict[str, List[CellEstimate]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    written = []
    for group, g in sorted(groups.items()):
        cmd = group_commands(config, group, g)
        overlay = select_dir / f"{cmd['run_name']}.yaml"
        overlay.write_text(f"# cells of group {group!r} of {config_path} ({len(g)} cells); use "
                           f"after it: --configfile {config_path} {overlay}\n"
                           + yaml.safe_dump(cmd["overlay"], sort_keys=False))
        targets = select_dir / f"{cmd['run_name']}.targets"
        targets.write_text("\n".join(cmd["targets"]) + "\n")
        written += [overlay, targets]
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.gpu_hours",
                                description=__doc__.split("\n")[0])
    p.add_argument("--configfile", required=True,
                   help="the workflow config (replaces workflow/config/default.yaml, as in "
                        "Snakemake)")
    p.add_argument("--results", action="append", default=None,
                   help="results directory with finished runs (measured pass counts, GPU-seconds, "
                        "prepared manifests); repeatable; default: the config's results_dir")
    p.add_argument("--markdown", help="write the Markdown report here (also printed)")
    p.add_argument("--select-dir",
                   help="write one overlay config and one target list per group here")
    p.add_argument("--robust-fraction", type=float, default=1.0,
                   help="share of the AutoAttack examples assumed robust after its first "
                        "sub-attack (default 1: every example through every sub-attack, the "
                        "upper bound)")
    p.add_argument("--cells", action="store_true", help="also print one line per cell")
    args = p.parse_args(argv)
    try:
        config = load_config(Path(args.configfile))
        results = [Path(r) for r in (args.results or [config.get("results_dir", "results")])]
        rows = estimate(config, results, args.robust_fraction)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render_markdown(args.configfile, config, rows, args.select_dir, args.robust_fraction)
    if args.cells:
        text += ("\n| cell | epochs | train size | fwd / bwd | eval | GPU-h | source |\n"
                 "|---|---|---|---|---|---|---|\n")
        text += "\n".join(f"| {'/'.join(map(str, r.cell))} | {r.epochs} | {r.train_size} | "
                          f"{_fmt_count(r.train_fwd)} / {_fmt_count(r.train_bwd)} | "
                          f"{_fmt_count(r.eval_fb)} | {_fmt_hours(r.gpu_hours)} | {r.source} |"
                          for r in rows) + "\n"
    if args.select_dir:
        write_selection(Path(args.select_dir), args.configfile, config, rows)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
