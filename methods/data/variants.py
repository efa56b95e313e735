"""Derived dataset variants: long-tailed class profiles and synthetic label noise.

Both act on the *train* split only; val/test stay balanced (long tail) and clean (noise).  When a
spec asks for both, the long-tail subsample is drawn first and the noise is applied to the
surviving train labels (the noisy long-tailed setting of Meta-Weight-Net's follow-ups and of the
IADA author's ``NLT_CIFAR``).

Long tail (Cao et al. 2019, LDAM-DRW ``IMBALANCECIFAR10.get_img_num_per_cls``; Cui et al. 2019;
Meta-Weight-Net ``data_utils.get_img_num_per_cls``)::

    n_c = int(n_max * (1 / imbalance_factor) ** (c / (C - 1)))      c = 0 .. C-1

class 0 is the head, class C-1 the tail (no class shuffling), ``int`` floors as in those codes.

Label noise, each train label independently:

* ``symmetric`` (default convention, Co-teaching ``noisify_multiclass_symmetric``, Han et al.
  2018): with probability ``rate`` the label is replaced by one of the *other* C-1 classes,
  uniformly, so ``rate`` is the expected fraction of wrong labels -- the number the realised noise
  rate in the manifest is compared with.  ``include_true_class=True`` gives the Meta-Weight-Net /
  CAAT ``uniform_mix_C`` convention instead: with probability ``rate`` the label is redrawn
  uniformly from all C classes (it may stay correct), so the expected wrong fraction is
  ``rate * (C - 1) / C``.
* ``pair`` (Co-teaching ``noisify_pairflip``): with probability ``rate``, ``c -> (c + 1) mod C``.
* ``flip`` (Meta-Weight-Net ``load_corrupted_data.flip_labels_C``, the "flip" / pair-flip noise of
  MW-Net, CAAT and the IADA author's ``NLT_CIFAR``): every class c gets one target class t_c != c,
  drawn uniformly from the other classes (classes in index order, from the same seeded
  generator, before the labels); each label of class c becomes t_c with probability ``rate``.
  MW-Net draws the targets with ``np.random.seed(1)``; here they follow the spec's ``seed`` and
  are written into the manifest (``label_noise.flip_targets``).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

NOISE_KINDS = ("symmetric", "pair", "flip")


def flip_targets(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``flip`` noise's target class of every class: uniform over the other classes, class by class."""
    return np.array([(c + rng.integers(1, num_classes)) % num_classes for c in range(num_classes)], dtype=np.int64)


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class train sizes of the exponential long-tail profile (see module docstring)."""
    if num_classes < 2:
        raise ValueError(f"long tail needs at least 2 classes, got {num_classes}")
    if not imbalance_factor >= 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor!r}")
    mu = 1.0 / imbalance_factor
    return [int(n_max * mu ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def corrupt_labels(labels: torch.Tensor | np.ndarray, num_classes: int, kind: str, rate: float,
                   rng: np.random.Generator, include_true_class: bool = False) -> torch.Tensor:
    """Return noisy copies of ``labels`` (int64 tensor); ``labels`` itself is not modified.

    All labels get one Bernoulli(``rate``) draw, then (symmetric only) all get one replacement-class
    draw, whatever their class, so the result is a pure function of the generator state (``flip``
    draws its C targets first, :func:`flip_targets`).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"label_noise.kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label_noise.rate must be in [0, 1), got {rate!r}")
    if include_true_class and kind != "symmetric":
        raise ValueError("label_noise.include_true_class applies to kind 'symmetric' only")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).numpy()
    n = len(y)
    targets = flip_targets(num_classes, rng) if kind == "flip" else None
    hit = rng.random(n) < rate
    if kind == "flip":
        replacement = targets[y]
    elif kind == "pair":
        replacement = (y + 1) % num_classes
    elif include_true_class:
        replacement = rng.integers(0, num_classes, n)
    else:
        replacement = (y + rng.integers(1, num_classes, n)) % num_classes
    return torch.from_numpy(np.where(hit, replacement, y).astype(np.int64))


def noise_report(clean: torch.Tensor, noisy: torch.Tensor, num_classes: int) -> Dict[str, object]:
    """Realised noise: overall fraction of wrong labels and per clean class."""
    wrong = clean != noisy
    per_class_n = torch.bincount(clean, minlength=num_classes)
    per_class_wrong = torch.bincount(clean[wrong], minlength=num_classes)
    per_class = [round(float(w) / float(n), 6) if n else None
                 for w, n in zip(per_class_wrong.tolist(), per_class_n.tolist())]
    return {"realised_rate": int(wrong.sum()) / len(clean) if len(clean) else 0.0,
            "num_wrong": int(wrong.sum()), "num_labels": int(len(clean)),
            "per_class_realised_rate": per_class}
