"""Coloured MNIST: a subpopulation-shift benchmark built from the embedded MNIST-5k (and full MNIST).

Sources ``cmnist5k`` and ``cmnist`` read the same verified files, pools and fixed test split as
``mnist5k`` / ``mnist``; their spec must carry ``spurious: {correlation: rho, ...}``
(:mod:`methods.data.spec`), and :func:`methods.data.prepare.prepare_dataset` draws a colour for
every image of every split, tints the digits and writes the 3-channel images to ``images.pt``
once, so every method, seed of a method and rerun sees the same pictures.

Scheme (one colour per class, after Arjovsky et al.'s Colored MNIST, *Invariant Risk
Minimization*, 2019, and the CMNIST of group DRO / LISA (Yao et al. 2022), extended from 2 to C
classes so that the task stays 10-way MNIST and every other MNIST-5k scenario and recipe applies):

* palette: C colours, colour k = HSV(hue k/C, saturation 1, value 1) in 8-bit RGB (for C = 10:
  red, orange, yellow-green, green, spring green, cyan, azure, violet, magenta, rose); class k's
  own colour is colour k.  Ten colours for ten digits rather than Arjovsky's binary red/green: a
  binary colour over 10 classes could only reveal a coarse partition of the labels, so the
  shortcut would not solve the task; here it does (at correlation 1, colour alone predicts the
  label exactly), which is the failure mode a spurious correlation has to offer.
* colour draw, per image independently, w.r.t. its true (clean) digit y: with probability
  ``correlation`` the colour is y's colour; otherwise one of the other C-1 colours, uniformly.
  Train uses ``correlation``; test ``test_correlation`` (default 1/C, i.e. the colour is uniform
  over all C colours and independent of the label: the correlation is broken); val
  ``val_correlation`` (default: the test value, so the val / meta set is unbiased like
  Waterbirds' official val split).  One NumPy stream per split (``STREAM_COLOUR_*`` of
  :mod:`methods.data.splits`, seeded by the spec's ``seed``): the train correlation never changes
  the test images.
* tint: the grey digit v in 0..255 times the colour, channel by channel,
  ``round(v * rgb[c] / 255)`` in integer arithmetic; the background stays black.
* groups (``spurious.groups``): ``label_colour`` (default) -- group = y * C + colour, the (label,
  attribute) groups of group DRO, C^2 groups; ``label_aligned`` -- group = 2 y + [colour = y's
  colour], 2C groups (per class: conflicting, aligned), larger groups when the test set is small.
  Groups are recorded for every split (``splits.pt`` and ``Split.groups``).

The realised fraction of images wearing their label's colour is written into the manifest for
every split (``spurious.realised``), exactly as counted.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np
import torch

from ..registry import DATASETS
from .sources import Mnist5kSource, MnistSource


def palette(num_colours: int) -> np.ndarray:
    """``num_colours x 3`` uint8 RGB: colour k = HSV(k / num_colours, 1, 1)."""
    rgb = [colorsys.hsv_to_rgb(k / num_colours, 1.0, 1.0) for k in range(num_colours)]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def draw_colours(labels: np.ndarray | torch.Tensor, num_colours: int, correlation: float,
                 rng: np.random.Generator) -> np.ndarray:
    """One colour per label (int64): its own colour w.p. ``correlation``, else a uniform other one.

    Every label gets one uniform draw and one offset draw whatever it becomes, so the result is a
    pure function of the generator state.  At ``correlation = 1/C`` each colour has probability
    1/C whatever the label (independent).
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"spurious correlation must be in [0, 1], got {correlation!r}")
    y = np.asarray(labels, dtype=np.int64)
    aligned = rng.random(len(y)) < correlation
    other = (y + rng.integers(1, num_colours, len(y))) % num_colours
    return np.where(aligned, y, other).astype(np.int64)


def tint(x_grey: torch.Tensor, colours: np.ndarray, rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``N x 1 x H x W`` grey digits -> uint8 ``N x 3 x H x W``: ``round(v * rgb / 255)``."""
    if x_grey.dtype != torch.uint8 or x_grey.dim() != 4 or x_grey.shape[1] != 1:
        raise ValueError(f"tint expects uint8 N x 1 x H x W, got {x_grey.dtype} {tuple(x_grey.shape)}")
    v = x_grey.to(torch.int32)                                                  # N x 1 x H x W
    c = torch.from_numpy(rgb[np.asarray(colours, dtype=np.int64)].astype(np.int32))[:, :, None, None]
    return ((v * c + 127) // 255).to(torch.uint8).contiguous()                  # N x 3 x H x W


@dataclass(frozen=True)
class Grouping:
    """How (label, colour) map to group ids."""

    definition: str
    num_groups: Callable[[int], int]
    ids: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    names: Callable[[int], List[str]]


GROUPINGS: Dict[str, Grouping] = {
    "label_colour": Grouping(
        "group = label * C + colour (group DRO's (y, a) with a = colour index)",
        lambda c: c * c,
        lambda y, colour, c: y * c + colour,
        lambda c: [f"y={y},colour={a}" for y in range(c) for a in range(c)]),
    "label_aligned": Grouping(
        "group = 2 * label + [colour == the label's colour] (0: conflicting, 1: aligned)",
        lambda c: 2 * c,
        lambda y, colour, c: 2 * y + (colour == y).astype(np.int64),
        lambda c: [f"y={y},{kind}" for y in range(c) for kind in ("conflicting", "aligned")]),
}


def colour_report(labels: np.ndarray | torch.Tensor, colours: np.ndarray, num_colours: int,
                  configured: float) -> Dict[str, object]:
    """The realised correlation of one split, exactly as counted."""
    y = np.asarray(labels, dtype=np.int64)
    aligned = int((colours == y).sum())
    return {"configured_correlation": configured, "aligned": aligned, "n": int(len(y)),
            "realised_correlation": aligned / len(y) if len(y) else None,
            "colour_counts": np.bincount(colours, minlength=num_colours).tolist()}


class ColouredMnist5kSource(Mnist5kSource):
    """Coloured MNIST-5k: the embedded MNIST-5k (same file, pools and fixed test split), tinted
    by ``prepare`` as the spec's ``spurious`` block says (module docstring).  Calling the source
    gives the grey digits; the prepared images are ``3 x 28 x 28``."""

    name, image_shape = "cmnist5k", (3, 28, 28)
    spurious_colour = True
    stores_images = True


class ColouredMnistSource(MnistSource):
    """Coloured MNIST: torchvision MNIST (official 60k / 10k), tinted like ``cmnist5k``."""

    name, image_shape = "cmnist", (3, 28, 28)
    spurious_colour = True
    stores_images = True
    checksums_from = "mnist"


for _source in (ColouredMnist5kSource(), ColouredMnistSource()):
    DATASETS.register(_source.name)(_source)
