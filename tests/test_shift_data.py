"""Subpopulation-shift data: coloured MNIST-5k (correlation realised and recorded, broken at test,
groups), Waterbirds and CelebA readers on tiny files in their real on-disk formats, and the
clean balanced meta set held out before label noise / imbalance."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import methods.data as D
from methods.data.shift import GROUPINGS, palette
from methods.registry import DATASETS

try:
    from .fixtures_data import row_colour, write_celeba, write_mnist, write_waterbirds
except ImportError:  # tests/ is not a package
    from fixtures_data import row_colour, write_celeba, write_mnist, write_waterbirds

NO_DATA = Path("/nonexistent-advrepro-data")
C = 10


def within_binomial(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def prepared(tmp_path_factory, name, spec, data_dir=NO_DATA):
    out = tmp_path_factory.mktemp(name)
    manifest = D.prepare_dataset(name, spec, data_dir, out)
    return manifest, D.load_dataset(name, spec, data_dir, out), out


CM90 = {"source": "cmnist5k", "spurious": {"correlation": 0.9}}


@pytest.fixture(scope="module")
def cm90(tmp_path_factory):
    return prepared(tmp_path_factory, "cm90", CM90)


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    return prepared(tmp_path_factory, "grey", {"source": "mnist5k"})[1]


def colours_of(split) -> np.ndarray:
    return (split.groups % C).numpy()     # label_colour: group = y * C + colour


# ---------------------------------------------------------------------------------- coloured MNIST-5k
def test_palette_is_ten_distinct_full_hues():
    rgb = palette(C)
    assert rgb.shape == (C, 3) and len({tuple(c) for c in rgb.tolist()}) == C
    assert rgb[0].tolist() == [255, 0, 0] and rgb[5].tolist() == [0, 255, 255]
    assert (rgb.max(1) == 255).all() and (rgb.min(1) == 0).all()     # saturation 1, value 1


def test_cmnist_images_are_the_mnist5k_digits_tinted(cm90, grey):
    manifest, b, _ = cm90
    assert b.image_shape == (3, 28, 28) and b.num_groups == C * C and b.num_classes == C
    rgb = palette(C).astype(np.int64)
    for split, ref in ((b.train, grey.train), (b.val, grey.val), (b.test, grey.test)):
        assert torch.equal(split.indices, ref.indices) and torch.equal(split.y, ref.y)   # same images, clean labels
        v = ref.x.numpy().astype(np.int64)                                              # N x 1 x H x W
        want = (v * rgb[colours_of(split)][:, :, None, None] + 127) // 255             # round(v * rgb / 255)
        assert np.array_equal(split.x.numpy(), want.astype(np.uint8))
        full = v[:, 0] == 255                                     # saturated pixels wear exactly the colour
        image_of_pixel = np.nonzero(full)[0]
        assert (split.x.numpy().transpose(0, 2, 3, 1)[full] == rgb[colours_of(split)[image_of_pixel]]).all()
    assert manifest["source"]["image_shape"] == [3, 28, 28] and manifest["files"]["images"]["shape"] == [3, 28, 28]


def test_cmnist_train_correlation_is_the_configured_one_and_recorded_exactly(cm90):
    manifest, b, _ = cm90
    real = manifest["spurious"]["realised"]
    for name, split, rho in (("train", b.train, 0.9), ("val", b.val, 0.1), ("test", b.test, 0.1)):
        aligned = int((colours_of(split) == split.y.numpy()).sum())
        assert real[name]["aligned"] == aligned and real[name]["n"] == len(split)
        assert real[name]["realised_correlation"] == aligned / len(split)
        assert real[name]["configured_correlation"] == rho
        assert within_binomial(aligned, len(split), rho), (name, aligned)
        assert real[name]["colour_counts"] == np.bincount(colours_of(split), minlength=C).tolist()
    # misaligned train images are spread over the other nine colours uniformly
    y, col = b.train.y.numpy(), colours_of(b.train)
    offsets = ((col - y) % C)[col != y]
    assert offsets.min() >= 1 and all(within_binomial(int((offsets == k).sum()), len(offsets), 1 / 9) for k in range(1, C))
    assert manifest["spec"]["spurious"] == {"correlation": 0.9, "test_correlation": 0.1, "val_correlation": 0.1,
                                            "groups": "label_colour"}
    assert real["train"]["aligned"] == 3157       # pinned: the prepared default images must not drift


def test_cmnist_test_colour_is_independent_of_the_label(cm90):
    _, b, _ = cm90
    y, col = b.test.y.numpy(), colours_of(b.test)
    for c in range(C):                          # P(colour = k | y = c) = 1/C for every k
        assert within_binomial(int((col[y == c] == c).sum()), int((y == c).sum()), 1 / C)
    for k in range(C):
        assert within_binomial(int((col == k).sum()), len(col), 1 / C)


def test_cmnist_groups_recorded_for_every_split(cm90):
    manifest, b, out = cm90
    _, arrays = D.read_prepared(out)
    for name, split in (("train", b.train), ("val", b.val), ("test", b.test)):
        assert split.groups.dtype == torch.int64 and torch.equal(arrays[f"{name}_groups"], split.groups)
        assert torch.equal(split.groups // C, split.y)           # group = label * C + colour
        assert manifest["groups"]["counts"][name] == torch.bincount(split.groups, minlength=C * C).tolist()
    assert manifest["groups"]["num_groups"] == C * C and manifest["groups"]["names"][23] == "y=2,colour=3"


def test_cmnist_extremes_label_aligned_groups_and_independent_streams(tmp_path_factory, cm90):
    spec = {"source": "cmnist5k", "seed": 0,
            "spurious": {"correlation": 1.0, "test_correlation": 0.0, "val_correlation": 0.5, "groups": "label_aligned"}}
    m, b, _ = prepared(tmp_path_factory, "cm-ext", spec)
    assert m["spurious"]["realised"]["train"]["realised_correlation"] == 1.0
    assert m["spurious"]["realised"]["test"]["aligned"] == 0
    assert b.num_groups == 2 * C and GROUPINGS["label_aligned"].num_groups(C) == 2 * C
    assert torch.equal(b.train.groups, 2 * b.train.y + 1)          # all aligned
    assert torch.equal(b.test.groups, 2 * b.test.y)                # all conflicting
    # the train correlation draws from its own stream: the val / test colours of the 0.9 run are
    # unchanged when only the test / val correlations are equal
    same_test = {"source": "cmnist5k", "spurious": {"correlation": 0.5}}
    _, b2, _ = prepared(tmp_path_factory, "cm50", same_test)
    _, b90, _ = cm90
    assert torch.equal(b2.test.x, b90.test.x) and torch.equal(b2.val.x, b90.val.x)
    assert not torch.equal(b2.train.x, b90.train.x)


def test_cmnist_written_once_seeded_and_verified(cm90, tmp_path):
    manifest, b, out = cm90
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert D.prepare_dataset("cm90", CM90, NO_DATA, out) == manifest          # a no-op
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    other = D.prepare_dataset("cm90", {**CM90, "seed": 1}, NO_DATA, tmp_path / "s1")
    assert other["spurious"]["realised"]["train"]["aligned"] != manifest["spurious"]["realised"]["train"]["aligned"]
    again = D.load_dataset("cm90", CM90, NO_DATA, out)
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.test.groups, b.test.groups)
    # load reads images.pt and refuses a modified one
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    torch.save({"train": b.train.x[:1], "val": b.val.x, "test": b.test.x}, bad / "images.pt")
    with pytest.raises(D.DatasetChecksumError, match="images.pt"):
        D.load_dataset("cm90", CM90, NO_DATA, bad)


def test_cmnist_with_long_tail_keeps_groups_aligned_with_labels(tmp_path_factory):
    spec = {"source": "cmnist5k", "long_tail": {"imbalance_factor": 10}, "spurious": {"correlation": 0.8}}
    m, b, _ = prepared(tmp_path_factory, "cm-lt", spec)
    assert b.train.class_counts(C) == m["long_tail"]["class_counts"] and b.val.class_counts(C) == [10] * C
    assert torch.equal(b.train.groups // C, b.train.y)
    assert within_binomial(m["spurious"]["realised"]["train"]["aligned"], len(b.train), 0.8)


def test_cmnist_from_the_torchvision_mnist_files(tmp_path, monkeypatch):
    from methods.data import sources
    table, a = write_mnist(tmp_path / "data", n_train=40, n_test=20)
    monkeypatch.setitem(sources.OFFICIAL_CHECKSUMS, "mnist", table)     # cmnist verifies with MNIST's table
    spec = {"source": "cmnist", "val_size": 10, "spurious": {"correlation": 1.0, "groups": "label_aligned"}}
    m = D.prepare_dataset("cm", spec, tmp_path / "data", tmp_path / "prep")
    b = D.load_dataset("cm", spec, tmp_path / "data", tmp_path / "prep")
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20) and b.train.x.shape[1:] == (3, 28, 28)
    assert all(f["verified"] for f in m["source"]["files"])
    assert torch.equal(b.train.groups, 2 * b.train.y + 1)
    rgb = palette(C).astype(np.int64)
    v = a["x_train"][b.train.indices.numpy()].astype(np.int64)
    assert np.array_equal(b.train.x.numpy(), ((v * rgb[b.train.y.numpy()][:, :, None, None] + 127) // 255))


def test_coloured_sources_normalisation_and_shape():
    assert D.normalization("dataset", "cmnist5k") == ((0.1307,) * 3, (0.3081,) * 3)
    assert D.normalization("none", "cmnist5k") == ((0.0,) * 3, (1.0,) * 3)
    assert D.dataset_image_shape("x", CM90) == (3, 28, 28)
    assert D.dataset_image_shape("x", {"source": "waterbirds", "image_size": 32}) == (3, 32, 32)
    assert D.dataset_image_shape("x", {"source": "celeba"}) == (3, 64, 64)
    assert D.normalization("dataset", "waterbirds") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------- Waterbirds
@pytest.fixture
def waterbirds(tmp_path):
    return tmp_path, write_waterbirds(tmp_path / "data")


def _row_of(img: torch.Tensor) -> int:
    return int(round((float(img[0].float().mean()) - 5) / 10))      # fixtures paint red = 10 row + 5


def test_waterbirds_reads_the_group_dro_release_format(waterbirds):
    root, rows = waterbirds
    spec = {"source": "waterbirds", "image_size": 16}
    m = D.prepare_dataset("wb", spec, root / "data", root / "prep")
    b = D.load_dataset("wb", spec, root / "data", root / "prep")
    assert b.image_shape == (3, 16, 16) and b.num_groups == 4 and b.num_classes == 2
    for split, code in ((b.train, 0), (b.val, 1), (b.test, 2)):
        want = np.flatnonzero(rows["split"] == code)
        assert split.indices.tolist() == want.tolist()                      # metadata rows, official partition
        assert split.y.tolist() == rows["y"][want].tolist()
        assert split.groups.tolist() == (2 * rows["y"][want] + rows["place"][want]).tolist()
        assert [_row_of(img) for img in split.x] == want.tolist()            # each image is its row's file
    assert m["splits"]["val_kind"] == "official validation split"
    assert m["groups"]["names"] == ["landbird,land", "landbird,water", "waterbird,land", "waterbird,water"]
    assert m["groups"]["counts"]["train"] == [3, 1, 1, 3]
    assert m["source"]["image_size"] == 16 and m["source"]["val_pool_size"] == 6
    # group DRO's evaluation transform (get_transform_cub), composed as in its code
    folder = root / "data" / "waterbird_complete95_forest2water2"
    rel = (folder / "metadata.csv").read_text().splitlines()[5].split(",")[1]            # row 4: train
    ref = T.Compose([T.Resize((int(16 * 256 / 224), int(16 * 256 / 224))), T.CenterCrop(16), T.PILToTensor()])
    with Image.open(folder / rel) as img:
        assert torch.equal(b.train.x[4], ref(img.convert("RGB")))


def test_waterbirds_meta_set_from_official_val_and_clean_under_noise(waterbirds):
    root, rows = waterbirds
    spec = {"source": "waterbirds", "image_size": 8, "label_noise": {"kind": "symmetric", "rate": 0.4, "meta_per_class": 2}}
    m = D.prepare_dataset("wbn", spec, root / "data", root / "prep")
    b = D.load_dataset("wbn", spec, root / "data", root / "prep")
    assert b.val.class_counts(2) == [2, 2] and set(b.val.indices.tolist()) <= set(np.flatnonzero(rows["split"] == 1))
    assert b.val.y.tolist() == rows["y"][b.val.indices.numpy()].tolist()          # clean
    assert len(b.train) == 8 and m["splits"]["val_kind"].startswith("balanced meta set of 2 per class")
    assert b.train.groups.tolist() == (2 * rows["y"][:8] + rows["place"][:8]).tolist()   # groups: true labels
    with pytest.raises(ValueError, match="'val_size'"):
        D.parse_spec("wb", {"source": "waterbirds", "val_size": 3})


def test_waterbirds_missing_data_names_the_expected_path(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.prepare_dataset("wb", {"source": "waterbirds"}, tmp_path, tmp_path / "prep")
    msg = str(err.value)
    assert str(tmp_path / "waterbird_complete95_forest2water2" / "metadata.csv") in msg
    assert "waterbird_complete95_forest2water2.tar.gz" in msg
    with pytest.raises(D.DatasetNotFoundError, match="download"):
        DATASETS.get("waterbirds")(tmp_path, download=True)


def test_waterbirds_missing_image_and_bad_metadata(waterbirds):
    root, _ = waterbirds
    folder = root / "data" / "waterbird_complete95_forest2water2"
    victim = next(folder.glob("*/bird_0003.jpg"))
    victim.unlink()
    with pytest.raises(D.DatasetNotFoundError, match="bird_0003.jpg"):
        DATASETS.get("waterbirds")(root / "data", image_size=8)
    (folder / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.jpg,0,0\n")
    with pytest.raises(D.DatasetChecksumError, match="'place'"):
        DATASETS.get("waterbirds")(root / "data", image_size=8)


# ---------------------------------------------------------------------------------------------- CelebA
def test_celeba_reads_torchvision_layout_blond_hair_vs_male(tmp_path):
    rows = write_celeba(tmp_path / "data")
    spec = {"source": "celeba", "image_size": 8}
    m = D.prepare_dataset("celeba", spec, tmp_path / "data", tmp_path / "prep")
    b = D.load_dataset("celeba", spec, tmp_path / "data", tmp_path / "prep")
    assert b.image_shape == (3, 8, 8) and b.num_groups == 4
    for split, code in ((b.train, 0), (b.val, 1), (b.test, 2)):
        want = np.flatnonzero(rows["split"] == code)
        assert split.indices.tolist() == want.tolist()
        assert split.y.tolist() == rows["y"][want].tolist()
        assert split.groups.tolist() == (2 * rows["y"][want] + rows["male"][want]).tolist()
        assert [_row_of(img) for img in split.x] == want.tolist()
    assert m["groups"]["counts"]["test"] == [1, 1, 1, 1] and m["groups"]["names"][3] == "blond,male"
    # group DRO's get_transform_celebA (eval): centre crop of the shorter side, then resize;
    # the white bands above and below the face are cropped away
    ref = T.Compose([T.CenterCrop(18), T.Resize((8, 8)), T.PILToTensor()])
    with Image.open(tmp_path / "data" / "celeba" / "img_align_celeba" / "000003.jpg") as img:
        assert torch.equal(b.train.x[2], ref(img.convert("RGB")))
    assert abs(float(b.train.x[2].float().mean()) - np.mean(row_colour(2))) < 6


def test_celeba_missing_and_malformed_files(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        DATASETS.get("celeba")(tmp_path)
    assert str(tmp_path / "celeba" / "list_attr_celeba.txt") in str(err.value)
    assert "img_align_celeba" in str(err.value)
    write_celeba(tmp_path)
    attr = tmp_path / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([lines[0], lines[1].replace("Blond_Hair", "Blond")] + lines[2:]) + "\n")
    with pytest.raises(D.DatasetChecksumError, match="'Blond_Hair'"):
        DATASETS.get("celeba")(tmp_path, image_size=8)


# ------------------------------------------------------------------------- spec rules of the new fields
@pytest.mark.parametrize("spec,field", [
    ({"source": "cmnist5k"}, "spurious"),
    ({"source": "mnist5k", "spurious": {"correlation": 0.9}}, "spurious"),
    ({"source": "cmnist5k", "spurious": {"correlation": 1.5}}, "spurious.correlation"),
    ({"source": "cmnist5k", "spurious": {}}, "spurious.correlation"),
    ({"source": "cmnist5k", "spurious": {"correlation": 0.9, "groups": "colour"}}, "spurious.groups"),
    ({"source": "cmnist5k", "spurious": {"correlation": 0.9, "strength": 1}}, "spurious.strength"),
    ({"source": "mnist5k", "image_size": 32}, "image_size"),
    ({"source": "celeba", "image_size": 4}, "image_size"),
    ({"source": "celeba", "val_size": 10}, "val_size"),
    ({"source": "mnist5k", "label_noise": {"kind": "pair", "rate": 0.2, "meta_per_class": 10}, "val_size": 10},
     "val_size"),
    ({"source": "mnist5k", "long_tail": {"imbalance_factor": 10},
      "label_noise": {"kind": "pair", "rate": 0.2, "meta_per_class": 10}}, "label_noise.meta_per_class"),
    ({"source": "mnist5k", "label_noise": {"kind": "pair", "rate": 0.2, "meta_per_class": -1}},
     "label_noise.meta_per_class"),
])
def test_bad_new_spec_fields_are_named(spec, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        D.parse_spec("ds", spec)


def test_new_fields_leave_old_spec_digests_unchanged():
    # digests of the dict every manifest written before these fields holds
    s = D.parse_spec("x", {"source": "mnist5k", "label_noise": {"kind": "symmetric", "rate": 0.4}})
    assert "spurious" not in s.to_dict() and "image_size" not in s.to_dict()
    assert "meta_per_class" not in s.to_dict()["label_noise"]
    assert s.digest() == hashlib.sha256(
        b'{"label_noise": {"include_true_class": false, "kind": "symmetric", "rate": 0.4}, "long_tail": null, '
        b'"seed": 0, "source": "mnist5k", "split_seed": 0, "val_size": 500}').hexdigest()
