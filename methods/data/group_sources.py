"""Waterbirds and CelebA, the subpopulation-shift benchmarks of group DRO, for users who have the data.

Both read the real on-disk formats under ``data_dir`` (nothing is downloaded), resize every image
to ``image_size`` x ``image_size`` (spec field ``image_size``, default 64; 32 is cheaper on a CPU;
group DRO trains ResNet-50 at 224), and carry a group id per example, ``group = 2 y + a`` as in
group DRO (``kohpangwei/group_DRO`` ``data/cub_dataset.py``, ``data/celebA_dataset.py``:
``group_array = y * (n_groups / 2) + confounder``).  Their official train / val / test
partitions are kept: the official val split is the val set (a balanced meta set of
``meta_per_class`` per class is drawn from it when the spec asks for one).  ``prepare`` stores
the resized images in ``images.pt``, so they are decoded once.

==========  =====================================================================================
waterbirds  ``waterbird_complete95_forest2water2/metadata.csv`` (columns ``img_filename``, ``y``
            (0 landbird, 1 waterbird), ``split`` (0 train, 1 val, 2 test), ``place`` (0 land,
            1 water)) and the images at the ``img_filename`` paths relative to that folder: the
            group DRO release ``waterbird_complete95_forest2water2.tar.gz`` extracted into
            ``data_dir``.  Groups: 0 landbird on land, 1 landbird on water, 2 waterbird on land,
            3 waterbird on water.  Resize as group DRO's evaluation transform
            (``get_transform_cub``): to ``int(S * 256 / 224)`` square, then a centre crop of S.
celeba      torchvision's layout ``celeba/list_attr_celeba.txt`` (line 1: the count, line 2: the
            40 attribute names, then ``<file> <+-1 x 40>``), ``celeba/list_eval_partition.txt``
            (``<file> <0|1|2>``) and ``celeba/img_align_celeba/<file>``.  Target ``Blond_Hair``,
            spurious attribute ``Male`` (group DRO's setting); groups: 0 not blond female,
            1 not blond male, 2 blond female, 3 blond male.  Resize as group DRO's
            ``get_transform_celebA``: centre crop of the shorter side (178), then resize to S.
==========  =====================================================================================

``indices`` are 0-based row positions in ``metadata.csv`` / ``list_attr_celeba.txt``.  There are
no official checksums: the metadata files' sha256 and one sha256 over every image's (path,
sha256) are recorded in the manifest (``verified: false``).  Faults stop ``prepare`` with the file
and the fix: a missing metadata file or image (:class:`DatasetNotFoundError`), a truncated or
malformed metadata file (short rows, missing columns, non-integer codes, a count line that does
not match) or an image PIL cannot decode (truncated, not an image) (:class:`DatasetFormatError`).
"""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ..registry import DATASETS
from .sources import DatasetFormatError, DatasetNotFoundError, Source
from .splits import Split

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
UNVERIFIED = "no official checksum exists; sha256 recorded for provenance"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class GroupImageSource(Source):
    """Binary-label image folders with one spurious binary attribute (group = 2 y + a)."""

    num_classes = 2
    default_augmentation = "none"      # group DRO's default (augment_data off)
    official_val = True
    stores_images = True
    resizable = True
    default_image_size = 64
    image_shape = (3, 64, 64)          # at the default image_size
    folder = ""
    metadata: Tuple[str, ...] = ()
    group_names: Tuple[str, ...] = ()
    group_definition = ""
    resize_rule = ""

    def required_files(self) -> List[str]:
        return [f"{self.folder}/{m}" for m in self.metadata]

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        return [{"path": rel, "sha256": file_sha256(data_dir / rel), "verified": False, "reference": UNVERIFIED}
                for rel in self.required_files()]

    def _download(self, data_dir: Path) -> None:
        raise RuntimeError(f"no automatic download for {self.name!r}")

    def _rows(self, data_dir: Path) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
        """(image paths relative to the folder, y, attribute, split code) per metadata row."""
        raise NotImplementedError

    def _square(self, img: Image.Image, size: int) -> Image.Image:
        raise NotImplementedError

    def _read(self, data_dir: Path, image_size: int | None = None) -> Tuple[Split, Split, Dict[str, Any], Split]:
        size = int(image_size or self.default_image_size)
        names, y, attr, split = self._rows(data_dir)
        root = data_dir / self.folder
        absent = [root / n for n in names if not (root / n).is_file()]
        if absent:
            listing = "\n  ".join(str(p) for p in absent[:5])
            raise DatasetNotFoundError(
                f"dataset source {self.name!r}: {len(absent)} image file(s) listed in the metadata are missing, "
                f"e.g.:\n  {listing}\nTo provide them: {self.how_to_provide.format(root=data_dir)}")
        x = np.empty((len(names), 3, size, size), dtype=np.uint8)
        digest = hashlib.sha256()
        for i, rel in enumerate(names):
            blob = (root / rel).read_bytes()
            digest.update(f"{rel}\0{hashlib.sha256(blob).hexdigest()}\n".encode())
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    square = self._square(img.convert("RGB"), size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # PIL: UnidentifiedImageError (not an image), "image file is truncated", ...
                raise self._bad(data_dir, root / rel, f"not a readable image ({type(err).__name__}: {err}; "
                                f"{len(blob)} bytes)") from None
            x[i] = np.asarray(square, dtype=np.uint8).transpose(2, 0, 1)
        groups = 2 * y + attr
        pools = []
        for code in (SPLIT_CODES["train"], SPLIT_CODES["test"], SPLIT_CODES["val"]):
            rows = np.flatnonzero(split == code)
            pools.append(Split(x=torch.from_numpy(x[rows]).contiguous(), y=torch.from_numpy(y[rows]),
                               indices=torch.from_numpy(rows.astype(np.int64)),
                               groups=torch.from_numpy(groups[rows])))
        info = {"reader": f"advrepro {self.name} reader (PIL + torchvision.transforms.functional)",
                "image_size": size, "resize": self.resize_rule,
                "images": {"count": len(names), "sha256_of_path_and_sha256_lines": digest.hexdigest(),
                           "verified": False, "reference": UNVERIFIED},
                "groups": {"num_groups": 4, "names": list(self.group_names), "definition": self.group_definition}}
        return pools[0], pools[1], info, pools[2]

    def _bad(self, data_dir: Path, path: Path, why: str) -> DatasetFormatError:
        return self.format_error(data_dir, str(path), why, path)

    def _text(self, data_dir: Path, path: Path) -> str:
        try:
            return path.read_text()
        except UnicodeDecodeError as err:
            raise self._bad(data_dir, path, f"not a text file ({err})") from None


def _binary(values: Sequence[str], path: Path, column: str, source: GroupImageSource, data_dir: Path,
            line_numbers: Sequence[int]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            out[i] = int(v)
        except (TypeError, ValueError):
            raise source._bad(data_dir, path, f"line {line_numbers[i]}: column {column!r} must hold an integer, "
                              f"found {v!r}") from None
    return out


class WaterbirdsSource(GroupImageSource):
    """Waterbirds (Sagawa et al. 2020, group DRO): CUB birds pasted on Places backgrounds,
    95% of train waterbirds on water and landbirds on land; official 4,795 / 1,199 / 5,794 split."""

    name = "waterbirds"
    folder = "waterbird_complete95_forest2water2"
    metadata = ("metadata.csv",)
    group_names = ("landbird,land", "landbird,water", "waterbird,land", "waterbird,water")
    group_definition = "group = 2 * y + place (y: 0 landbird, 1 waterbird; place: 0 land, 1 water)"
    resize_rule = "resize to int(S * 256 / 224) square, centre crop S (group DRO get_transform_cub, eval)"
    how_to_provide = ("download waterbird_complete95_forest2water2.tar.gz from the group DRO release "
                      "(https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz) and extract "
                      "it into {root}, giving {root}/waterbird_complete95_forest2water2/metadata.csv and the "
                      "image folders beside it")

    def _rows(self, data_dir: Path):
        path = data_dir / self.folder / "metadata.csv"
        reader = csv.DictReader(io.StringIO(self._text(data_dir, path), newline=""))
        rows, lines = [], []
        for r in reader:
            rows.append(r)
            lines.append(reader.line_num)
        need = ("img_filename", "y", "split", "place")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise self._bad(data_dir, path, f"missing column(s) {missing}; expected the group DRO header with "
                            f"{list(need)}")
        if not rows:
            raise self._bad(data_dir, path, "no rows after the header (truncated or empty)")
        width = len(reader.fieldnames)
        for n, r in zip(lines, rows):
            if None in r:
                raise self._bad(data_dir, path, f"line {n} has more fields than the header's {width}")
            if None in r.values():
                have = sum(v is not None for v in r.values())
                raise self._bad(data_dir, path, f"line {n} has {have} of the header's {width} fields "
                                f"(truncated or malformed)")
        col = {c: [r[c] for r in rows] for c in need}
        y, place, split = (_binary(col[c], path, c, self, data_dir, lines) for c in ("y", "place", "split"))
        for c, v in (("y", y), ("place", place), ("split", split)):
            allowed = (0, 1, 2) if c == "split" else (0, 1)
            if not np.isin(v, allowed).all():
                raise self._bad(data_dir, path, f"column {c!r} holds values outside {list(allowed)}")
        return col["img_filename"], y, place, split

    def _square(self, img: Image.Image, size: int) -> Image.Image:
        big = int(size * 256.0 / 224.0)
        return TF.center_crop(TF.resize(img, [big, big]), [size, size])


class CelebASource(GroupImageSource):
    """CelebA (Liu et al. 2015) in torchvision's layout, as group DRO uses it: target Blond_Hair,
    spurious attribute Male; official 162,770 / 19,867 / 19,962 partition."""

    name = "celeba"
    folder = "celeba"
    metadata = ("list_attr_celeba.txt", "list_eval_partition.txt")
    target, confounder = "Blond_Hair", "Male"
    group_names = ("not blond,female", "not blond,male", "blond,female", "blond,male")
    group_definition = "group = 2 * Blond_Hair + Male (attributes -1 -> 0, 1 -> 1)"
    resize_rule = "centre crop of the shorter side, resize to S x S (group DRO get_transform_celebA, eval)"
    how_to_provide = ("download CelebA's list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba.zip "
                      "(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or torchvision.datasets.CelebA(root, "
                      "download=True)) and place them as {root}/celeba/list_attr_celeba.txt, "
                      "{root}/celeba/list_eval_partition.txt and {root}/celeba/img_align_celeba/*.jpg")

    def _rows(self, data_dir: Path):
        attr_path = data_dir / self.folder / "list_attr_celeba.txt"
        part_path = data_dir / self.folder / "list_eval_partition.txt"
        lines = self._text(data_dir, attr_path).splitlines()
        if len(lines) < 2:
            raise self._bad(data_dir, attr_path, "expected a count line and an attribute-name line")
        names = lines[1].split()
        for a in (self.target, self.confounder):
            if a not in names:
                raise self._bad(data_dir, attr_path, f"attribute {a!r} not in the header line")
        ti, ci = names.index(self.target), names.index(self.confounder)
        files, target, conf = [], [], []
        for n, line in enumerate(lines[2:], start=3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(names) + 1 or not set(parts[1:]) <= {"1", "-1"}:
                raise self._bad(data_dir, attr_path, f"line {n}: expected a file name and {len(names)} values of 1 / -1")
            files.append(parts[0])
            target.append(parts[1 + ti] == "1")
            conf.append(parts[1 + ci] == "1")
        try:
            count = int(lines[0].split()[0])
        except (ValueError, IndexError):
            raise self._bad(data_dir, attr_path, "line 1 must be the number of images") from None
        if count != len(files):
            raise self._bad(data_dir, attr_path, f"line 1 announces {count} images, {len(files)} lines follow")
        partition = {}
        for line in self._text(data_dir, part_path).splitlines():
            parts = line.split()
            if parts:
                partition[parts[0]] = parts[1] if len(parts) > 1 else ""
        try:
            split = np.array([int(partition[f]) for f in files], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise self._bad(data_dir, part_path, f"no valid partition (0 / 1 / 2) for {e.args[0]!r}") from None
        if not np.isin(split, (0, 1, 2)).all():
            raise self._bad(data_dir, part_path, "partitions must be 0 (train), 1 (val) or 2 (test)")
        return ([f"img_align_celeba/{f}" for f in files], np.array(target, dtype=np.int64),
                np.array(conf, dtype=np.int64), split)

    def _square(self, img: Image.Image, size: int) -> Image.Image:
        side = min(img.size)
        return TF.resize(TF.center_crop(img, [side, side]), [size, size])


for _source in (WaterbirdsSource(), CelebASource()):
    DATASETS.register(_source.name)(_source)
