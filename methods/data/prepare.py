"""``prepare_dataset`` (the Snakemake ``prepare_data`` step) and ``load_dataset`` (trainer, evaluator).

``prepare_dataset`` verifies (or fetches) the source files, draws the splits and variants once, and
writes into ``out_dir``:

* ``splits.pt`` -- int64 tensors ``train_indices``, ``val_indices``, ``test_indices`` (positions in
  the source split), ``train_labels`` (the labels to train on: noisy if the spec asks for noise) and
  ``train_clean_labels``;
* ``manifest.json`` -- provenance and statistics (see :func:`prepare_dataset`), written last, so
  its presence marks a finished preparation.

Both are written atomically (:func:`methods.results.atomic_write_bytes`: temp file in
``out_dir``, fsync, then ``os.replace``).  Re-running with the same inputs leaves byte-identical
files untouched.  ``load_dataset`` never re-draws anything: it
reads the indices and labels back, re-verifies the source files against the digests recorded in the
manifest, and refuses a ``prepared_dir`` made for a different spec.

Split protocol (train split of the source; test is always the official / fixed test split):

* no long tail: val = class-stratified holdout of ``val_size`` (largest-remainder per-class quotas),
  drawn with ``split_seed``; train = the rest.
* long tail: val = balanced meta set of ``meta_per_class`` per class, drawn with ``split_seed``;
  from the rest, class ``c`` keeps ``n_c`` images (drawn with ``seed``), ``n_max`` = the smallest
  remaining class size (= the balanced per-class count, e.g. 4,990 for CIFAR-10 with 10/class held
  out, as in Meta-Weight-Net).
* label noise (optional, after the long tail if both are given): train labels only, drawn with
  ``seed``; val and test stay clean.
"""
from __future__ import annotations

import io
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch
import torchvision

from ..registry import DATASETS
from ..results import atomic_write_bytes
from .sources import DatasetChecksumError, Source, SourceData
from .spec import DatasetSpec, parse_spec
from .splits import (STREAM_HOLDOUT, STREAM_LONG_TAIL, STREAM_NOISE, DatasetBundle, Split,
                     proportional_counts, rng_for, stratified_take)
from .variants import corrupt_labels, long_tail_counts, noise_report

FORMAT = "advrepro.dataset/1"
MANIFEST = "manifest.json"
SPLITS_FILE = "splits.pt"
_ARRAYS = ("train_indices", "val_indices", "test_indices", "train_labels", "train_clean_labels")


class DatasetNotPreparedError(FileNotFoundError):
    """``load_dataset`` was called on a directory ``prepare_dataset`` has not completed."""


class StalePreparationError(ValueError):
    """The prepared directory belongs to a different dataset name or spec."""


def _counts(y: torch.Tensor | np.ndarray, c: int) -> list[int]:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=c).tolist()


def _draw(name: str, spec: DatasetSpec, source: Source, data: SourceData
          ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """All random choices of one preparation; returns the arrays and the manifest's variant part."""
    c = source.num_classes
    y = data.train.y.numpy()
    have = np.bincount(y, minlength=c)
    lt_meta = None
    if spec.long_tail is not None:
        lt = spec.long_tail
        if have.min() < lt.meta_per_class:
            raise ValueError(f"dataset {name!r}: spec field 'long_tail.meta_per_class' = {lt.meta_per_class} exceeds "
                             f"the smallest class of the train split ({int(have.min())} images)")
        val_pos, rest = stratified_take(y, np.full(c, lt.meta_per_class), rng_for(spec.split_seed, STREAM_HOLDOUT))
        n_max = int(np.bincount(y[rest], minlength=c).min())
        target = long_tail_counts(n_max, c, lt.imbalance_factor)
        keep, _ = stratified_take(y[rest], np.array(target), rng_for(spec.seed, STREAM_LONG_TAIL))
        train_pos = rest[keep]
        lt_meta = {"imbalance_factor": lt.imbalance_factor, "meta_per_class": lt.meta_per_class, "n_max": n_max,
                   "class_counts": target, "seed": spec.seed,
                   "profile": "n_c = int(n_max * (1/imbalance_factor)**(c/(C-1))) (Cao et al. 2019; Cui et al. 2019)",
                   "class_order": "class 0 is the head, class C-1 the tail (no shuffling)"}
        val_kind = "balanced meta set held out of the train split before the long-tail subsampling"
    else:
        if spec.val_size > len(y):
            raise ValueError(f"dataset {name!r}: spec field 'val_size' = {spec.val_size} exceeds the train split "
                             f"({len(y)} images)")
        val_pos, train_pos = stratified_take(y, proportional_counts(have, spec.val_size),
                                             rng_for(spec.split_seed, STREAM_HOLDOUT))
        val_kind = "class-stratified holdout of the train split"
    pos = torch.from_numpy(train_pos)
    clean = data.train.y[pos].clone()
    labels, noise_meta = clean, None
    if spec.label_noise is not None:
        ln = spec.label_noise
        labels = corrupt_labels(clean, c, ln.kind, ln.rate, rng_for(spec.seed, STREAM_NOISE), ln.include_true_class)
        noise_meta = {"kind": ln.kind, "rate": ln.rate, "include_true_class": ln.include_true_class,
                      "seed": spec.seed, "applies_to": "train", **noise_report(clean, labels, c),
                      "noisy_class_counts": _counts(labels, c),
                      "convention": ("pair: c -> (c+1) mod C w.p. rate (Co-teaching)" if ln.kind == "pair" else
                                     "symmetric: w.p. rate redrawn uniformly from all C classes (Meta-Weight-Net)"
                                     if ln.include_true_class else
                                     "symmetric: w.p. rate replaced by a uniform other class (Co-teaching)")}
    arrays = {"train_indices": data.train.indices[pos].clone(),
              "val_indices": data.train.indices[torch.from_numpy(val_pos)].clone(),
              "test_indices": data.test.indices.clone(),
              "train_labels": labels, "train_clean_labels": clean}
    splits = {"split_seed": spec.split_seed, "val_kind": val_kind,
              "train": {"size": len(train_pos), "class_counts": _counts(clean, c)},
              "val": {"size": len(val_pos), "class_counts": _counts(y[val_pos], c)},
              "test": {"size": len(data.test), "class_counts": _counts(data.test.y, c)}}
    return arrays, {"splits": splits, "long_tail": lt_meta, "label_noise": noise_meta}


def _digests(files: list) -> Dict[str, str]:
    return {f["path"]: f.get("md5") or f["sha256"] for f in files}


def _serialize(arrays: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: arrays[k].contiguous() for k in _ARRAYS}, buf)
    return buf.getvalue()


def prepare_dataset(name: str, spec: Mapping[str, Any], data_dir: Path, out_dir: Path,
                    download: bool = False) -> Dict[str, Any]:
    """Verify or fetch the source, draw splits and variants, write ``out_dir`` atomically.

    Returns the manifest: ``name``, the normalized ``spec`` and its sha256, ``source`` (name, classes,
    image shape, pool sizes, every verified file with its digest and the checksum table used),
    ``default_augmentation``, ``splits`` (seed, sizes and class counts), ``long_tail`` (parameters,
    ``n_max``, target class counts) and ``label_noise`` (parameters, realised rate overall and per
    class), ``files`` (``splits.pt`` and its sha256) and package ``versions``.  Idempotent.
    """
    parsed = parse_spec(name, spec)
    source: Source = DATASETS.get(parsed.source)
    data = source(Path(data_dir), download=download)
    arrays, variant = _draw(name, parsed, source, data)
    blob = _serialize(arrays)
    manifest = {
        "format": FORMAT, "name": name, "spec": parsed.to_dict(), "spec_sha256": parsed.digest(),
        "source": {"name": source.name, "num_classes": source.num_classes, "image_shape": list(source.image_shape),
                   "train_pool_size": len(data.train), "test_size": len(data.test), "files": data.files, **data.info},
        "default_augmentation": source.default_augmentation,
        **variant,
        "files": {"splits": {"path": SPLITS_FILE, "sha256": hashlib.sha256(blob).hexdigest()}},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__},
    }
    manifest = json.loads(json.dumps(manifest, sort_keys=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath, spath = out_dir / MANIFEST, out_dir / SPLITS_FILE
    if mpath.is_file() and spath.is_file() and spath.read_bytes() == blob:
        try:
            if json.loads(mpath.read_text()) == manifest:
                return manifest
        except json.JSONDecodeError:
            pass
    atomic_write_bytes(spath, blob)
    atomic_write_bytes(mpath, (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
    return manifest


def read_prepared(prepared_dir: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The manifest and the verified arrays of ``splits.pt`` (see module docstring)."""
    prepared_dir = Path(prepared_dir)
    mpath = prepared_dir / MANIFEST
    if not mpath.is_file():
        raise DatasetNotPreparedError(
            f"{prepared_dir} holds no prepared dataset ({mpath} does not exist); run prepare_dataset "
            f"(the Snakemake prepare_data rule) for it first")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise StalePreparationError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare again")
    spath = prepared_dir / manifest["files"]["splits"]["path"]
    blob = spath.read_bytes() if spath.is_file() else b""
    if hashlib.sha256(blob).hexdigest() != manifest["files"]["splits"]["sha256"]:
        raise DatasetChecksumError(f"{spath} is missing or does not match the sha256 in {mpath}; prepare again")
    arrays = torch.load(io.BytesIO(blob), weights_only=True)
    return manifest, {k: arrays[k] for k in _ARRAYS}


def _select(pool: Split, indices: torch.Tensor, what: str, labels: torch.Tensor | None = None) -> Split:
    pos = torch.searchsorted(pool.indices, indices)
    if len(indices) and (int(pos.max()) >= len(pool) or not torch.equal(pool.indices[pos], indices)):
        raise DatasetChecksumError(f"prepared {what} indices do not exist in the source data; prepare again")
    y = pool.y[pos] if labels is None else labels.to(torch.int64)
    return Split(x=pool.x[pos].contiguous(), y=y.clone(), indices=indices.clone())


def load_dataset(name: str, spec: Mapping[str, Any], data_dir: Path, prepared_dir: Path) -> DatasetBundle:
    """Load the dataset exactly as ``prepare_dataset`` drew it (same indices, same noisy labels)."""
    parsed = parse_spec(name, spec)
    manifest, arrays = read_prepared(Path(prepared_dir))
    wanted = json.loads(json.dumps(parsed.to_dict(), sort_keys=True))
    if manifest["name"] != name or manifest["spec"] != wanted:
        diff = sorted(k for k in set(wanted) | set(manifest["spec"]) if wanted.get(k) != manifest["spec"].get(k))
        raise StalePreparationError(
            f"dataset {name!r}: {prepared_dir} was prepared for dataset {manifest['name']!r} with a different spec "
            f"(differing fields: {diff or 'none'}); prepare it again")
    source: Source = DATASETS.get(parsed.source)
    data = source(Path(data_dir), download=False)
    if _digests(data.files) != _digests(manifest["source"]["files"]):
        raise DatasetChecksumError(f"dataset {name!r}: the source files under {data_dir} differ from those "
                                   f"recorded in {Path(prepared_dir) / MANIFEST}; prepare again")
    return DatasetBundle(
        name=name,
        train=_select(data.train, arrays["train_indices"], "train", labels=arrays["train_labels"]),
        val=_select(data.train, arrays["val_indices"], "val"),
        test=_select(data.test, arrays["test_indices"], "test"),
        num_classes=source.num_classes, image_shape=tuple(source.image_shape),
        default_augmentation=source.default_augmentation, meta=manifest)
