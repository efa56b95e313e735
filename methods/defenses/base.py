"""The defence seam (torch): a defence turns a trained model into a *defended predictor*.

A defence is a :class:`Defense` subclass registered in :data:`methods.registry.DEFENSES` under
the name of its torch-free spec (:mod:`methods.defenses.specs`), built from a normalized spec
and set up once per evaluation with a :class:`DefenseContext` (classes, image shape, device,
the row budget per forward, and the sampling pool if it needs one).  It implements

* ``prepare(model, x)``: what the defence computes once per input without gradients (Mixup
  Inference: the model's prediction, which picks the partner classes); default nothing;
* ``draws(model, x, generator, k, prepared)``: the logits of ``k`` independent draws of its
  randomness at ``x``, shape ``(k, B, C)``, differentiable w.r.t. ``x`` (through the mixing,
  the noise, the rotation or the resize), every random number drawn from ``generator`` (a CPU
  ``torch.Generator``), so a seeded evaluation is reproducible;

and inherits ``log_probs(model, x, generator, samples)``: the defended predictor,
``log( (1/N) sum_k softmax(draw_k) )`` over ``N = samples`` draws (Mixup Inference's Algorithm 1
and the baselines of its code average softmax probabilities), computed as a ``logsumexp`` of
log-softmaxes so it stays finite and differentiable.  A deterministic defence has one draw.

:class:`DefendedModel` wraps ``log_probs`` into an ``nn.Module`` whose every forward draws fresh
randomness: the module adaptive attacks score restarts with, and the one AutoAttack attacks.  It
returns log-probabilities, not probabilities, so that the package sees logits-like outputs:
its cross-entropy of log-probabilities is exactly the negative log-likelihood of the defended
predictor (``log_softmax`` of a log-probability vector is itself), its DLR loss is computed on a
monotone, shift-invariant score, and its output check does not flag a probability output
(whose softmax cross-entropy would be nearly flat: every input within [e^0, e^1]).

:func:`build_pool` draws Mixup Inference's sampling pool from a split that never holds the
evaluated images (validation, else training with its clean labels) or, behind the
``test_split_as_official`` flag, from the test split as the official code does.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetBundle, augment_batch, read_prepared
from ..subsets import stratified_subset
from .specs import defense_label, is_randomized, normalize_defense_spec


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (SHA-256 of their ``|``-joined text): each metric of an
    evaluation gets its own stream, independent of which other metrics run."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------- sampling pool

@dataclass
class SamplePool:
    """Images ``x`` (float in [0, 1], on the evaluation device) sorted by class ``y``; class
    ``c`` occupies rows ``start[c] .. start[c] + count[c] - 1``.  ``record`` says where the pool
    came from (split, source indices, per-class counts, labels, augmentation, seed) and how many
    evaluated images it holds."""

    x: torch.Tensor
    y: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor
    record: Dict[str, Any]

    def sample(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pool rows of the given classes (any shape), uniform within each class: one uniform
        per entry from ``generator`` (float64, so ``floor(u * count)`` is exact)."""
        cls = classes.detach().cpu().long()
        u = torch.rand(cls.shape, generator=generator, dtype=torch.float64)
        n = self.count[cls]
        within = torch.minimum((u * n).long(), n - 1)
        return (self.start[cls] + within).to(self.x.device)


def _image_hashes(x_uint8: torch.Tensor) -> list:
    flat = x_uint8.detach().cpu().contiguous().flatten(1).numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest() for row in flat]


def build_pool(bundle: DatasetBundle, source: str, size: int, augmentation: str, seed: int,
               device: torch.device, prepared_dir: Optional[Path] = None,
               evaluated: Optional[torch.Tensor] = None) -> SamplePool:
    """Mixup Inference's sampling pool.

    ``source``: ``auto`` (``val`` if the validation split has images, else ``train``), ``val``
    (clean: held out of the train split before any label noise), ``train`` (with the clean
    labels ``prepare_dataset`` keeps in ``splits.pt`` as ``train_clean_labels``, read from
    ``prepared_dir``; the bundle's train labels may be noisy) or ``test_split_as_official``
    (the test split, as the official code: it holds the evaluated images).  ``size`` images are
    a class-stratified draw seeded with ``seed`` (all of them when the split is smaller);
    ``augmentation`` (a :func:`methods.data.augment_batch` kind) is applied once per image,
    seeded, as the official code loads its pool with the training transforms.  ``evaluated``:
    the evaluated images (uint8), to count how many the pool holds (compared byte for byte,
    before augmentation).  Every class must have at least one image.
    """
    resolved = ("val" if len(bundle.val) > 0 else "train") if source == "auto" else source
    if resolved == "val":
        split, labels, source_split = bundle.val, bundle.val.y, "train"
        label_note = "validation labels (held out of the train split before any label noise)"
    elif resolved == "train":
        split, source_split = bundle.train, "train"
        labels, label_note = _clean_train_labels(bundle, prepared_dir)
    elif resolved == "test_split_as_official":
        split, labels, source_split = bundle.test, bundle.test.y, "test"
        label_note = "test labels (the official pool: the evaluated split itself)"
    else:
        raise ValueError(f"pool: unknown source {source!r}")
    if len(split) == 0:
        raise ValueError(f"pool: the {resolved!r} split of dataset {bundle.name!r} is empty; "
                         f"choose pool: train or val")
    pick = stratified_subset(labels, int(size), seed)
    y = labels[pick].long()
    order = torch.argsort(y, stable=True)
    pick, y = pick[order], y[order]
    x_uint8 = split.x[pick]
    x = x_uint8.float().div_(255)
    if augmentation != "none":
        x = augment_batch(x, augmentation, torch.Generator().manual_seed(seed))
    count = torch.bincount(y, minlength=bundle.num_classes)
    if bool((count == 0).any()):
        missing = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"pool: the {resolved!r} pool of {len(y)} images has no image of "
                         f"class(es) {missing}; use a larger pool_size or another pool")
    start = torch.cumsum(count, 0) - count
    held = 0
    if evaluated is not None and len(evaluated):
        pool_hashes = set(_image_hashes(x_uint8))
        held = sum(h in pool_hashes for h in _image_hashes(evaluated))
    record = {"requested": source, "split": resolved, "source_split": source_split,
              "size": int(len(y)), "per_class": count.tolist(),
              "indices": split.indices[pick].tolist(), "labels": label_note,
              "augmentation": augmentation, "seed": int(seed),
              "evaluated_images_in_pool": int(held)}
    return SamplePool(x=x.to(device), y=y.to(device), start=start, count=count, record=record)


def _clean_train_labels(bundle: DatasetBundle, prepared_dir: Optional[Path]):
    noisy = bool((bundle.meta or {}).get("label_noise"))
    if prepared_dir is None:
        if noisy:
            raise ValueError("pool: train split with label noise needs the prepared directory "
                             "(its clean labels are in splits.pt)")
        return bundle.train.y, "training labels (no label noise in this dataset)"
    _, arrays = read_prepared(Path(prepared_dir))
    if not torch.equal(arrays["train_indices"], bundle.train.indices):
        raise ValueError(f"pool: {prepared_dir} does not hold the train split this bundle was "
                         f"loaded from; prepare the dataset again")
    clean = arrays["train_clean_labels"].long()
    note = ("clean training labels (train_clean_labels of splits.pt; the training labels are "
            "noisy)" if noisy else "training labels (no label noise in this dataset)")
    return clean, note


# ----------------------------------------------------------------------------- defences

@dataclass
class DefenseContext:
    """What :meth:`Defense.setup` is told: ``pool(spec)`` returns the sampling pool for a
    spec's pool fields (shared between defences asking for the same one); ``max_rows`` caps the
    rows of one forward (draws are chunked to fit)."""

    num_classes: int
    image_shape: tuple
    device: torch.device
    max_rows: int
    pool: Callable[[Mapping[str, Any]], SamplePool]


class Defense:
    """Base class of the evaluation-time defences (see the module docstring)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = normalize_defense_spec(spec)
        self.label = defense_label(self.spec)
        self.randomized = is_randomized(self.spec)
        self.max_rows: Optional[int] = None
        self.num_classes: Optional[int] = None

    @property
    def samples(self) -> int:
        """Draws averaged by the defended predictor (1 for a deterministic defence)."""
        return int(self.spec.get("samples", 1)) if self.randomized else 1

    def setup(self, ctx: DefenseContext) -> None:
        self.max_rows = int(ctx.max_rows)
        self.num_classes = int(ctx.num_classes)

    def prepare(self, model: nn.Module, x: torch.Tensor) -> Any:
        return None

    def draws(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, k: int,
              prepared: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def chunk(self, rows: int, k: int) -> int:
        """Draws per forward so that one forward holds at most ``max_rows`` rows (at least 1)."""
        if not self.max_rows:
            return k
        return max(1, min(k, self.max_rows // max(1, rows)))

    def log_probs(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                  samples: Optional[int] = None, prepared: Any = None) -> torch.Tensor:
        """The defended predictor: log of the softmax averaged over ``samples`` draws (default
        :attr:`samples`), shape ``(B, C)``, differentiable w.r.t. ``x``."""
        k = int(samples or self.samples)
        if prepared is None:
            prepared = self.prepare(model, x)
        per, parts, done = self.chunk(len(x), k), [], 0
        while done < k:
            n = min(per, k - done)
            parts.append(F.log_softmax(self.draws(model, x, generator, n, prepared), dim=-1))
            done += n
        return torch.logsumexp(torch.cat(parts), dim=0) - math.log(k)

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.log_probs(model, x, generator).argmax(dim=1)

    def describe(self) -> Dict[str, Any]:
        """The record of this defence in the evaluation result."""
        return {"name": self.spec["name"], "label": self.label, "spec": dict(self.spec),
                "randomized": self.randomized, "samples": self.samples, "pool": None}


class DefendedModel(nn.Module):
    """``forward(x)`` = the defence's log-probabilities over ``samples`` draws (default the
    defence's own), fresh randomness from ``generator`` at every call; ``model`` is a submodule,
    so eval mode and frozen parameters set on this module reach it."""

    def __init__(self, defense: Defense, model: nn.Module, generator: torch.Generator,
                 samples: Optional[int] = None) -> None:
        super().__init__()
        self.defense = defense
        self.model = model
        self.generator = generator
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.log_probs(self.model, x, self.generator, self.samples)
