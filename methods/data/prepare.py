"""``prepare_dataset`` (the Snakemake ``prepare_data`` step) and ``load_dataset`` (trainer, evaluator).

``prepare_dataset`` verifies (or fetches) the source files, draws the splits and variants once, and
writes into ``out_dir``:

* ``splits.pt`` -- int64 tensors ``train_indices``, ``val_indices``, ``test_indices`` (positions in
  the source split), ``train_labels`` (the labels to train on: noisy if the spec asks for noise) and
  ``train_clean_labels``; for sources that store images also ``val_labels`` and ``test_labels``,
  and for subpopulation datasets ``train_groups``, ``val_groups``, ``test_groups``;
* ``images.pt`` -- only for sources with ``stores_images`` (coloured MNIST, Waterbirds, CelebA):
  uint8 ``train``, ``val``, ``test`` images exactly as trained and evaluated (tinted / resized),
  so they are drawn or decoded once; ``load_dataset`` then reads them instead of the source;
* ``manifest.json`` -- provenance and statistics (see :func:`prepare_dataset`), written last, so
  its presence marks a finished preparation.

Both are written atomically (:func:`methods.results.atomic_write_bytes`: temp file in
``out_dir``, fsync, then ``os.replace``; a failed write -- disk full, read-only directory --
leaves the previous file byte for byte and raises an ``OSError`` naming it).  Re-running with the
same inputs leaves byte-identical files untouched.  ``splits.pt`` / ``images.pt`` are read back
only after their sha256 matched the manifest, and then with ``torch.load(weights_only=True)``
(:func:`methods.checkpoints.load_torch_file`), so a tampered file cannot run code.  ``load_dataset`` never re-draws anything: it
reads the indices and labels back, re-verifies the source files against the digests recorded in the
manifest, and refuses a ``prepared_dir`` made for a different spec.

Split protocol (train split of the source; test is always the official / fixed test split):

* no meta set: val = class-stratified holdout of ``val_size`` (largest-remainder per-class quotas),
  drawn with ``split_seed``; train = the rest.
* meta set (``long_tail.meta_per_class``, or ``label_noise.meta_per_class``): val = balanced meta
  set of ``meta_per_class`` per class, drawn with ``split_seed`` from the train split *before*
  the long tail and the noise, so it is balanced and clean (the IADA / Meta-Weight-Net meta set).
* sources with an official validation split (Waterbirds, CelebA): val = that split, or the
  balanced meta set drawn from it; train = the whole official train split.
* long tail: from the rest, class ``c`` keeps ``n_c`` images (drawn with ``seed``), ``n_max`` = the
  smallest remaining class size (= the balanced per-class count, e.g. 4,990 for CIFAR-10 with
  10/class held out, as in Meta-Weight-Net).
* label noise (optional, after the long tail if both are given): train labels only, drawn with
  ``seed``; val and test stay clean (their labels are the source's).
* coloured MNIST (``spurious``): colours drawn per split with ``seed`` w.r.t. the clean labels
  (:mod:`methods.data.shift`), after the long tail and noise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torchvision

from ..checkpoints import load_torch_file
from ..registry import DATASETS
from ..results import atomic_write_bytes
from .shift import GROUPINGS, colour_report, draw_colours, palette, tint
from .sources import DatasetChecksumError, Source, SourceData
from .spec import DatasetSpec, parse_spec
from .splits import (STREAM_COLOUR_TEST, STREAM_COLOUR_TRAIN, STREAM_COLOUR_VAL, STREAM_HOLDOUT,
                     STREAM_LONG_TAIL, STREAM_NOISE, DatasetBundle, Split, proportional_counts, rng_for,
                     stratified_take)
from .variants import corrupt_labels, flip_targets, long_tail_counts, noise_report

FORMAT = "advrepro.dataset/1"
MANIFEST = "manifest.json"
SPLITS_FILE = "splits.pt"
IMAGES_FILE = "images.pt"
SPLIT_NAMES = ("train", "val", "test")
_ARRAYS = ("train_indices", "val_indices", "test_indices", "train_labels", "train_clean_labels")
# Written only when the dataset has them, so every splits.pt written before they existed is unchanged.
_OPTIONAL = ("val_labels", "test_labels", "train_groups", "val_groups", "test_groups")


class DatasetNotPreparedError(FileNotFoundError):
    """``load_dataset`` was called on a directory ``prepare_dataset`` has not completed."""


class StalePreparationError(ValueError):
    """The prepared directory belongs to a different dataset name or spec."""


# The manifest's description of each noise convention, by (kind, include_true_class).
NOISE_CONVENTIONS = {
    ("pair", False): "pair: c -> (c+1) mod C w.p. rate (Co-teaching)",
    ("symmetric", True): "symmetric: w.p. rate redrawn uniformly from all C classes (Meta-Weight-Net)",
    ("symmetric", False): "symmetric: w.p. rate replaced by a uniform other class (Co-teaching)",
    ("flip", False): "flip: c -> t_c w.p. rate, one random target class t_c per class (Meta-Weight-Net flip)",
}


def _counts(y: torch.Tensor | np.ndarray, c: int) -> list[int]:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=c).tolist()


def _meta_field(spec: DatasetSpec) -> str:
    return "long_tail.meta_per_class" if spec.long_tail is not None else "label_noise.meta_per_class"


def _hold_out(name: str, spec: DatasetSpec, source: Source, data: SourceData
              ) -> Tuple[np.ndarray, np.ndarray, str]:
    """``(val positions in the val pool, train-pool positions left for training, val kind)``.

    The val pool is the official val split where the source has one, else the train split.
    """
    c = source.num_classes
    y = data.train.y.numpy()
    k = spec.meta_per_class
    holdout = rng_for(spec.split_seed, STREAM_HOLDOUT)
    if data.val is not None:
        vy = data.val.y.numpy()
        if k is None:
            return np.arange(len(vy), dtype=np.int64), np.arange(len(y), dtype=np.int64), "official validation split"
        have = np.bincount(vy, minlength=c)
        if have.min() < k:
            raise ValueError(f"dataset {name!r}: spec field {_meta_field(spec)!r} = {k} exceeds the smallest class "
                             f"of the official validation split ({int(have.min())} images)")
        val_pos, _ = stratified_take(vy, np.full(c, k), holdout)
        return val_pos, np.arange(len(y), dtype=np.int64), \
            f"balanced meta set of {k} per class drawn from the official validation split"
    have = np.bincount(y, minlength=c)
    if k is not None:
        if have.min() < k:
            raise ValueError(f"dataset {name!r}: spec field {_meta_field(spec)!r} = {k} exceeds the smallest class "
                             f"of the train split ({int(have.min())} images)")
        val_pos, rest = stratified_take(y, np.full(c, k), holdout)
        kind = ("balanced meta set held out of the train split before the long-tail subsampling"
                if spec.long_tail is not None else
                "balanced clean meta set held out of the train split before the label noise")
        return val_pos, rest, kind
    if spec.val_size > len(y):
        raise ValueError(f"dataset {name!r}: spec field 'val_size' = {spec.val_size} exceeds the train split "
                         f"({len(y)} images)")
    val_pos, train_pos = stratified_take(y, proportional_counts(have, spec.val_size), holdout)
    return val_pos, train_pos, "class-stratified holdout of the train split"


def _draw(name: str, spec: DatasetSpec, source: Source, data: SourceData
          ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, torch.Tensor]]]:
    """All random choices of one preparation; returns the arrays, the manifest's variant part and
    (``stores_images`` sources) the final images of every split."""
    c = source.num_classes
    y = data.train.y.numpy()
    val_pos, rest, val_kind = _hold_out(name, spec, source, data)
    lt_meta = None
    if spec.long_tail is not None:
        lt = spec.long_tail
        n_max = int(np.bincount(y[rest], minlength=c).min())
        target = long_tail_counts(n_max, c, lt.imbalance_factor)
        keep, _ = stratified_take(y[rest], np.array(target), rng_for(spec.seed, STREAM_LONG_TAIL))
        train_pos = rest[keep]
        lt_meta = {"imbalance_factor": lt.imbalance_factor, "meta_per_class": lt.meta_per_class, "n_max": n_max,
                   "class_counts": target, "seed": spec.seed,
                   "profile": "n_c = int(n_max * (1/imbalance_factor)**(c/(C-1))) (Cao et al. 2019; Cui et al. 2019)",
                   "class_order": "class 0 is the head, class C-1 the tail (no shuffling)"}
    else:
        train_pos = rest
    pos = torch.from_numpy(train_pos)
    clean = data.train.y[pos].clone()
    labels, noise_meta = clean, None
    if spec.label_noise is not None:
        ln = spec.label_noise
        labels = corrupt_labels(clean, c, ln.kind, ln.rate, rng_for(spec.seed, STREAM_NOISE), ln.include_true_class)
        noise_meta = {"kind": ln.kind, "rate": ln.rate, "include_true_class": ln.include_true_class,
                      "seed": spec.seed, "applies_to": "train", **noise_report(clean, labels, c),
                      "noisy_class_counts": _counts(labels, c),
                      "convention": NOISE_CONVENTIONS[(ln.kind, ln.include_true_class)]}
        if ln.kind == "flip":
            noise_meta["flip_targets"] = flip_targets(c, rng_for(spec.seed, STREAM_NOISE)).tolist()
        if ln.meta_per_class is not None:
            noise_meta["meta_set"] = {"meta_per_class": ln.meta_per_class, "labels": "clean (held out before the noise)"}
    val_pool = data.val if data.val is not None else data.train
    vpos = torch.from_numpy(val_pos)
    arrays = {"train_indices": data.train.indices[pos].clone(),
              "val_indices": val_pool.indices[vpos].clone(),
              "test_indices": data.test.indices.clone(),
              "train_labels": labels, "train_clean_labels": clean}
    splits = {"split_seed": spec.split_seed, "val_kind": val_kind,
              "train": {"size": len(train_pos), "class_counts": _counts(clean, c)},
              "val": {"size": len(val_pos), "class_counts": _counts(val_pool.y.numpy()[val_pos], c)},
              "test": {"size": len(data.test), "class_counts": _counts(data.test.y, c)}}
    variant: Dict[str, Any] = {"splits": splits, "long_tail": lt_meta, "label_noise": noise_meta}
    if not source.stores_images:
        return arrays, variant, None

    images = {"train": data.train.x[pos], "val": val_pool.x[vpos], "test": data.test.x}
    clean_y = {"train": clean, "val": val_pool.y[vpos].clone(), "test": data.test.y.clone()}
    arrays["val_labels"], arrays["test_labels"] = clean_y["val"], clean_y["test"]
    groups: Optional[Dict[str, torch.Tensor]] = None
    group_info: Optional[Dict[str, Any]] = None
    if spec.spurious is not None:
        images, groups, group_info, variant["spurious"] = _colour(spec, c, images, clean_y)
    elif "groups" in data.info:
        groups = {"train": data.train.groups[pos], "val": val_pool.groups[vpos], "test": data.test.groups}
        group_info = dict(data.info["groups"])
    if groups is not None:
        k = int(group_info["num_groups"])
        for split in SPLIT_NAMES:
            arrays[f"{split}_groups"] = groups[split].to(torch.int64).clone()
        group_info["counts"] = {split: _counts(groups[split], k) for split in SPLIT_NAMES}
        variant["groups"] = group_info
    return arrays, variant, {k: v.contiguous() for k, v in images.items()}


def _colour(spec: DatasetSpec, c: int, grey: Mapping[str, torch.Tensor], clean_y: Mapping[str, torch.Tensor]):
    """Tint every split (coloured MNIST, :mod:`methods.data.shift`); images, groups, group info, manifest part."""
    sp = spec.spurious
    rgb = palette(c)
    grouping = GROUPINGS[sp.groups]
    rho = {"train": sp.correlation, "val": sp.val_correlation, "test": sp.test_correlation}
    stream = {"train": STREAM_COLOUR_TRAIN, "val": STREAM_COLOUR_VAL, "test": STREAM_COLOUR_TEST}
    images, groups, realised = {}, {}, {}
    for split in SPLIT_NAMES:
        y = clean_y[split].numpy()
        colours = draw_colours(y, c, rho[split], rng_for(spec.seed, stream[split]))
        images[split] = tint(grey[split], colours, rgb)
        groups[split] = torch.from_numpy(grouping.ids(y, colours, c).astype(np.int64))
        realised[split] = colour_report(y, colours, c, rho[split])
    info = {"num_groups": grouping.num_groups(c), "names": grouping.names(c), "definition": grouping.definition}
    meta = {**dataclasses.asdict(sp), "seed": spec.seed, "palette_rgb": rgb.tolist(),
            "palette": "colour k = HSV(k/C, 1, 1); class k's colour is colour k",
            "draw": "w.p. correlation the label's colour, else a uniform other colour (w.r.t. the clean label)",
            "tint": "round(v * rgb / 255) per channel, black background",
            "realised": realised}
    return images, groups, info, meta


def _digests(files: list) -> Dict[str, str]:
    return {f["path"]: f.get("md5") or f["sha256"] for f in files}


def _serialize(arrays: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: arrays[k].contiguous() for k in _ARRAYS + _OPTIONAL if k in arrays}, buf)
    return buf.getvalue()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_dataset(name: str, spec: Mapping[str, Any], data_dir: Path, out_dir: Path,
                    download: bool = False) -> Dict[str, Any]:
    """Verify or fetch the source, draw splits and variants, write ``out_dir`` atomically.

    Returns the manifest: ``name``, the normalized ``spec`` and its sha256, ``source`` (name, classes,
    image shape, pool sizes, every verified file with its digest and the checksum table used),
    ``default_augmentation``, ``splits`` (seed, sizes and class counts), ``long_tail`` (parameters,
    ``n_max``, target class counts) and ``label_noise`` (parameters, realised rate overall and per
    class), ``files`` (``splits.pt`` and its sha256) and package ``versions``.  Subpopulation and
    derived-image datasets add ``groups`` (definition, names, per-split counts), ``spurious``
    (coloured MNIST: parameters, palette, realised correlation per split) and ``files.images``
    (``images.pt``, its sha256 and the image shape).  Idempotent.
    """
    parsed = parse_spec(name, spec)
    source: Source = DATASETS.get(parsed.source)
    options = {"image_size": parsed.image_size} if parsed.image_size is not None else {}
    data = source(Path(data_dir), download=download, **options)
    arrays, variant, images = _draw(name, parsed, source, data)
    blob = _serialize(arrays)
    files = {"splits": {"path": SPLITS_FILE, "sha256": hashlib.sha256(blob).hexdigest()}}
    image_blob = None
    shape = list(source.image_shape)
    if images is not None:
        shape = list(images["train"].shape[1:]) if len(images["train"]) else shape
        buf = io.BytesIO()
        torch.save({k: images[k] for k in SPLIT_NAMES}, buf)
        image_blob = buf.getvalue()
        files["images"] = {"path": IMAGES_FILE, "sha256": hashlib.sha256(image_blob).hexdigest(), "shape": shape}
    source_block = {"name": source.name, "num_classes": source.num_classes, "image_shape": shape,
                    "train_pool_size": len(data.train), "test_size": len(data.test), "files": data.files, **data.info}
    if data.val is not None:
        source_block["val_pool_size"] = len(data.val)
    manifest = {
        "format": FORMAT, "name": name, "spec": parsed.to_dict(), "spec_sha256": parsed.digest(),
        "source": source_block,
        "default_augmentation": source.default_augmentation,
        **variant,
        "files": files,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__},
    }
    manifest = json.loads(json.dumps(manifest, sort_keys=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath, spath, ipath = out_dir / MANIFEST, out_dir / SPLITS_FILE, out_dir / IMAGES_FILE
    images_current = image_blob is None or (ipath.is_file() and _file_sha256(ipath) == files["images"]["sha256"])
    if mpath.is_file() and spath.is_file() and spath.read_bytes() == blob and images_current:
        try:
            if json.loads(mpath.read_text()) == manifest:
                return manifest
        except json.JSONDecodeError:
            pass
    if image_blob is not None and not images_current:
        atomic_write_bytes(ipath, image_blob)
    atomic_write_bytes(spath, blob)
    atomic_write_bytes(mpath, (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
    return manifest


def dataset_image_shape(name: str, spec: Mapping[str, Any]) -> Tuple[int, int, int]:
    """``(C, H, W)`` of the images a dataset entry trains on, without preparing it (resizing
    sources: ``image_size``; coloured MNIST: 3 channels)."""
    parsed = parse_spec(name, spec)
    source: Source = DATASETS.get(parsed.source)
    if parsed.image_size is not None:
        return (int(source.image_shape[0]), parsed.image_size, parsed.image_size)
    return tuple(int(v) for v in source.image_shape)


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
    arrays = load_torch_file(spath, what="prepared split file", data=blob,
                             fix=f"delete {prepared_dir} and prepare the dataset again")
    if not isinstance(arrays, dict) or not all(isinstance(arrays.get(k), torch.Tensor) for k in _ARRAYS):
        raise DatasetChecksumError(f"{spath} does not hold the tensors {list(_ARRAYS)}; delete {prepared_dir} and "
                                   f"prepare the dataset again")
    return manifest, {k: arrays[k] for k in _ARRAYS + _OPTIONAL if k in arrays}


def _read_images(prepared_dir: Path, manifest: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    record = manifest["files"]["images"]
    path = Path(prepared_dir) / record["path"]
    if not path.is_file() or _file_sha256(path) != record["sha256"]:
        raise DatasetChecksumError(f"{path} is missing or does not match the sha256 in "
                                   f"{Path(prepared_dir) / MANIFEST}; prepare again")
    images = load_torch_file(path, what="prepared image file",
                             fix=f"delete {prepared_dir} and prepare the dataset again")
    if not isinstance(images, dict) or not all(isinstance(images.get(k), torch.Tensor) for k in SPLIT_NAMES):
        raise DatasetChecksumError(f"{path} does not hold the image tensors {list(SPLIT_NAMES)}; delete "
                                   f"{prepared_dir} and prepare the dataset again")
    return images


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
    num_groups = int(manifest["groups"]["num_groups"]) if manifest.get("groups") else None
    if "images" in manifest["files"]:
        # Derived images (tinted / resized): the prepared files are self-contained and verified by sha256.
        images = _read_images(Path(prepared_dir), manifest)
        labels = {"train": arrays["train_labels"], "val": arrays["val_labels"], "test": arrays["test_labels"]}
        splits = {s: Split(x=images[s], y=labels[s].to(torch.int64), indices=arrays[f"{s}_indices"],
                           groups=arrays.get(f"{s}_groups")) for s in SPLIT_NAMES}
        return DatasetBundle(name=name, **splits, num_classes=source.num_classes,
                             image_shape=tuple(manifest["files"]["images"]["shape"]),
                             default_augmentation=source.default_augmentation, meta=manifest, num_groups=num_groups)
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
        default_augmentation=source.default_augmentation, meta=manifest, num_groups=num_groups)
