"""Typed records for prepared data and the seeded, class-stratified index selection behind them.

Images are stored compactly as ``uint8`` tensors ``N x C x H x W`` (values 0..255); the trainer
converts a minibatch to float in [0, 1] (``x.float() / 255``).  Labels are ``int64``.  Every
:class:`Split` carries ``indices``: the position of each example in the *source split* it came
from (the official train or test split, or the 5,000-image array for ``mnist5k``), so a result
can always be traced back to the original files.  Datasets with subpopulations (coloured MNIST,
Waterbirds, CelebA) also carry ``groups``: one int64 group id per example, for every split.

Randomness here uses NumPy ``Generator`` streams derived from ``(seed, stream)`` through
``SeedSequence``, so the held-out set, the long-tail subsample and the label noise are independent
draws: changing the noise rate does not change which images are held out.  The chosen indices are
written to disk by :func:`methods.data.prepare.prepare_dataset`; loaders never re-draw them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

# Independent random streams; the numbers are part of the on-disk contract (changing one changes
# every prepared split), so they are constants, never derived from names or hashes.
STREAM_HOLDOUT = 1      # which train images are held out as val / meta set
STREAM_LONG_TAIL = 2    # which images each class keeps under the long-tail profile
STREAM_NOISE = 3        # label noise
STREAM_FIXED_TEST = 4   # mnist5k's fixed test split
STREAM_COLOUR_TRAIN = 5  # coloured MNIST: the colour of each train image
STREAM_COLOUR_VAL = 6    # ... of each val image
STREAM_COLOUR_TEST = 7   # ... of each test image


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """NumPy generator for one ``(seed, stream)`` pair (PCG64 via ``SeedSequence``)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


@dataclass(frozen=True)
class Split:
    """One split.  ``x``: uint8 ``N x C x H x W``; ``y``: int64 ``(N,)``; ``indices``: int64 ``(N,)``
    positions in the source split the examples came from; ``groups``: int64 ``(N,)`` group ids
    (subpopulation datasets only; ``None`` otherwise)."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    groups: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be uint8 N x C x H x W, got {self.x.dtype} {tuple(self.x.shape)}")
        n = self.x.shape[0]
        for name in ("y", "indices") + (("groups",) if self.groups is not None else ()):
            t = getattr(self, name)
            if t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise ValueError(f"Split.{name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()


@dataclass(frozen=True)
class DatasetBundle:
    """Everything the trainer and evaluator need from one prepared dataset entry.

    ``meta`` is the manifest written by ``prepare_dataset`` (source files and checksums, split seed
    and sizes, variant parameters, realised noise rate, class counts, and for subpopulation
    datasets the group definition and counts).  ``num_groups`` is set when the splits carry
    ``groups`` (ids ``0 .. num_groups-1``), else ``None``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    image_shape: Tuple[int, int, int]
    default_augmentation: str
    meta: Dict[str, Any] = field(default_factory=dict)
    num_groups: Optional[int] = None


def proportional_counts(class_counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class sizes summing exactly to ``total``, proportional to ``class_counts``.

    Largest-remainder rounding; ties go to the lower class index.  For a balanced source this is
    ``total / C`` per class whenever that is an integer.
    """
    class_counts = np.asarray(class_counts, dtype=np.int64)
    n = int(class_counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} examples from a pool of {n}")
    if total == 0:
        return np.zeros_like(class_counts)
    exact = class_counts * total / n
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - base)))  # largest remainder, then index
    base[order[:short]] += 1
    return base


def stratified_take(labels: np.ndarray, per_class: np.ndarray,
                    rng: np.random.Generator | torch.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Choose ``per_class[c]`` positions of class ``c`` uniformly at random, for every class.

    The suite's one stratified sampler: the prepared splits (validation hold-out, long-tail
    subsample, mnist5k's fixed test split) and, through :func:`methods.subsets.stratified_subset`,
    the evaluation subsets and the monitor batch.  Returns ``(chosen, rest)``, both sorted
    ascending, as int64 positions into ``labels``.  Classes are visited in index order and each
    draws one permutation of its members from ``rng``, so the result is a pure function of the
    generator state.  ``rng`` is the permutation source, and both kinds are kept because every
    prepared split and evaluation subset on disk was drawn with one of them:

    * a NumPy ``Generator``: ``rng.permutation(members)`` (the prepared splits, seeded by
      :func:`rng_for`);
    * a torch ``Generator``: ``members[torch.randperm(len(members), generator=rng)]`` (the
      evaluation subsets and the monitor batch, seeded by ``methods.runtime.cpu_generator``).
    """
    labels = np.asarray(labels)
    chosen = []
    for c, k in enumerate(np.asarray(per_class, dtype=np.int64)):
        members = np.flatnonzero(labels == c)
        if k > len(members):
            raise ValueError(f"class {c} has {len(members)} examples, {int(k)} requested")
        if isinstance(rng, torch.Generator):
            order = members[torch.randperm(len(members), generator=rng).numpy()]
        else:
            order = rng.permutation(members)
        chosen.append(order[:k])
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[picked] = False
    return picked.astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def take(split: Split, positions: np.ndarray | torch.Tensor, labels: torch.Tensor | None = None) -> Split:
    """Sub-split at ``positions`` of ``split`` (optionally with replacement labels); groups follow."""
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
    y = split.y[pos] if labels is None else labels
    groups = None if split.groups is None else split.groups[pos].clone()
    return Split(x=split.x[pos].contiguous(), y=y.clone(), indices=split.indices[pos].clone(), groups=groups)
