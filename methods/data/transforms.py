"""Normalization statistics for the model's internal ``Normalize`` layer, and batch augmentation.

Inputs stay in pixel space [0, 1] everywhere; normalization lives inside the model (spec section
2.1), so this module only *reports* statistics.  Augmentation runs on whole batches on any device,
with its randomness drawn from an explicit CPU ``torch.Generator`` so that a checkpointed generator
state reproduces the exact crops and flips after a resume.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from ..registry import DATASETS

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]

_MNIST = ((0.1307,), (0.3081,))
# Coloured MNIST: the grey digits' statistics on every channel (a tinted channel's own statistics
# depend on the palette and the correlation, so the untinted ones are the fixed choice).
_CMNIST = ((0.1307,) * 3, (0.3081,) * 3)
# Waterbirds / CelebA: the ImageNet statistics group DRO normalises with (pretrained ResNet-50).
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# N-FGSM / locuslab ``fast_adversarial`` per-dataset statistics (spec section 2.1 table).
DATASET_STATS: Dict[str, Stats] = {
    "mnist": _MNIST,
    "mnist5k": _MNIST,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744)),
    "cmnist5k": _CMNIST,
    "cmnist": _CMNIST,
    "waterbirds": _IMAGENET,
    "celeba": _IMAGENET,
}
# Batch-in-Batch ``defenses/model.py``: these CIFAR-10 statistics for every dataset.
BB_CIFAR10: Stats = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def _channels(source: str) -> int:
    try:
        return int(DATASETS.get(source).image_shape[0])
    except KeyError:
        raise ValueError(f"normalization: unknown dataset source {source!r}; known: {DATASETS.names()}") from None


def _dataset(source: str) -> Stats:
    _channels(source)
    return DATASET_STATS[source]


def _bb(source: str) -> Stats:
    c = _channels(source)
    if c != 3:
        raise ValueError(f"normalization 'bb_cifar10' has 3-channel statistics; source {source!r} has {c} channel(s)")
    return BB_CIFAR10


def _none(source: str) -> Stats:
    c = _channels(source)
    return (0.0,) * c, (1.0,) * c


NORMALIZATIONS: Dict[str, Callable[[str], Stats]] = {"dataset": _dataset, "bb_cifar10": _bb, "none": _none}


def normalization(kind: str, dataset_source: str) -> Stats:
    """``(mean, std)`` per channel for the model's ``Normalize`` layer.

    kind: ``'dataset'`` per-source statistics (N-FGSM / locuslab table; MNIST (0.1307,), (0.3081,)),
    ``'bb_cifar10'`` the BB code's CIFAR-10 statistics for every 3-channel source, ``'none'`` mean 0
    and std 1.  ``dataset_source`` is a source name (``spec['source']``), e.g. ``'svhn'``.
    """
    try:
        fn = NORMALIZATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown normalization kind {kind!r}; known: {sorted(NORMALIZATIONS)}") from None
    return fn(dataset_source)


AUGMENTATIONS = ("crop_flip", "crop", "none")


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Augment a batch ``x`` (float in [0, 1], ``B x C x H x W``, any device).

    * ``'crop_flip'``: ``RandomCrop((H, W), padding=4)`` with zero fill, then
      ``RandomHorizontalFlip(p=0.5)`` -- the CIFAR recipe of N-FGSM, locuslab and BB;
    * ``'crop'``: the crop alone (N-FGSM's SVHN recipe);
    * ``'none'``: returns ``x`` itself and draws nothing from ``generator``.

    Per image, the crop offsets (row, column) are uniform in ``0..2*padding`` like torchvision's
    ``RandomCrop``.  Draw order from the CPU ``generator``: B row offsets, B column offsets, then
    (crop_flip) B uniforms for the flips.  Vectorized gather, no Python loop over images.  The
    result has the shape, dtype and device of ``x`` (a new tensor unless ``kind`` is ``'none'``).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation kind {kind!r}; known: {list(AUGMENTATIONS)}")
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects B x C x H x W, got shape {tuple(x.shape)}")
    if generator.device.type != "cpu":
        raise ValueError("augment_batch needs a CPU torch.Generator (its state is checkpointed)")
    if kind == "none":
        return x
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    cols = dx[:, None] + torch.arange(w)[None, :]                           # B x W
    if kind == "crop_flip":
        flip = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)[None, :]                           # B x H
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))                 # zero fill
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded[bi, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # B x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()
