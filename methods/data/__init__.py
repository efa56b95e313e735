"""Datasets for advrepro: embedded MNIST-5k, torchvision MNIST / CIFAR-10 / CIFAR-100 / SVHN, and
their long-tailed and noisy-label variants; coloured MNIST(-5k) with a spurious colour-label
correlation (:mod:`.shift`), and Waterbirds / CelebA for users who have the data
(:mod:`.group_sources`), all with per-example groups.

Importing this package registers every source in :data:`methods.registry.DATASETS`.

* :func:`prepare_dataset` -- verify or fetch the files, draw splits and variants once, write
  ``manifest.json`` + ``splits.pt`` atomically (the Snakemake ``prepare_data`` step);
* :func:`load_dataset` -- a :class:`DatasetBundle` of uint8 ``N x C x H x W`` splits, exactly as
  prepared;
* :func:`normalization` -- ``(mean, std)`` for the model's internal ``Normalize`` layer;
* :func:`augment_batch` -- crop / crop+flip / none on a float batch in [0, 1], seeded by a CPU
  generator.
"""
from . import group_sources, prepare, shift, sources, spec, splits, transforms, variants  # noqa: F401  (registers the sources)
from .prepare import (DatasetNotPreparedError, StalePreparationError, dataset_image_shape, load_dataset,
                      prepare_dataset, read_prepared)
from .sources import DatasetChecksumError, DatasetFormatError, DatasetNotFoundError, SourceData
from .spec import DatasetSpec, parse_spec
from .splits import DatasetBundle, Split
from .transforms import augment_batch, normalization
from .variants import corrupt_labels, long_tail_counts

__all__ = [
    "DatasetBundle", "DatasetChecksumError", "DatasetFormatError", "DatasetNotFoundError", "DatasetNotPreparedError", "DatasetSpec",
    "SourceData", "Split", "StalePreparationError", "augment_batch", "corrupt_labels", "dataset_image_shape",
    "load_dataset",
    "long_tail_counts", "normalization", "parse_spec", "prepare_dataset", "read_prepared",
]
