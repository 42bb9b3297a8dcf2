"""TFDS data sets as pool parts, read through `tfds.data_source` (no TensorFlow).

Works where the user has prepared the data set in array_record format, e.g. on a
machine with TensorFlow and a network connection:

    tfds build cifar10 --file_format=array_record --data_dir=~/tensorflow_datasets

then copied to `data_dir` here. Nothing is downloaded: an unprepared data set
fails at once with a message saying how to prepare it, instead of retrying.
"""

from __future__ import annotations

import numpy as np

from jax_advprune.data.sources import PoolFormatError, check_labels
from jax_advprune.errors import UserError

SUPPORTED = ("cifar10", "cifar100", "svhn_cropped")


class DatasetNotPreparedError(UserError, RuntimeError):
    """The TFDS data set is not available locally in a random-access format."""


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("data.name='tfds' needs tensorflow-datasets: pip install -e '.[tfds]'") from error
    return tfds


class TfdsPart:
    """Split `split` of TFDS data set `dataset` as a PoolPart (records of `image` uint8, `label`)."""

    def __init__(self, dataset: str, split: str, data_dir: str | None, num_classes: int):
        if dataset not in SUPPORTED:
            raise ValueError(f"TFDS data set {dataset!r} is not supported; choose one of {SUPPORTED}")
        self.dataset, self.split, self.data_dir, self.num_classes = dataset, split, data_dir or None, num_classes
        self.name = f"tfds:{dataset}/{split}"
        self._open()
        self._labels = None
        features = self._source.dataset_info.features
        declared = features["label"].num_classes
        if declared != num_classes:
            raise PoolFormatError(f"{self.name}: has {declared} classes, but data.num_classes is {num_classes}")
        self.image_shape = tuple(features["image"].shape)

    def _open(self):
        tfds = _import_tfds()
        try:
            self._source = tfds.data_source(self.dataset, split=self.split, data_dir=self.data_dir, download=False)
        except Exception as error:  # tfds raises several types for "not prepared here"
            where = self.data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
            raise DatasetNotPreparedError(
                f"TFDS data set {self.dataset!r} (split {self.split!r}) is not prepared in array_record format in {where}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
                f"Prepare it where TensorFlow and a network are available with "
                f"`tfds build {self.dataset} --file_format=array_record --data_dir=DIR` and copy DIR here "
                f"(set data.tfds_data_dir), or for CIFAR use data.name='cifar10'/'cifar100' with the python tarball."
            ) from error

    def __len__(self) -> int:
        return len(self._source)

    def labels(self) -> np.ndarray:
        """All labels (N,) int64 (decoded once, then cached: 8 bytes per sample)."""
        if self._labels is None:
            labels = np.array([int(self._source[i]["label"]) for i in range(len(self))], np.int64)
            check_labels(self.name, labels, self.num_classes)
            self._labels = labels
        return self._labels

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (M,) -> images (M, H, W, C) uint8, labels (M,) int64."""
        records = [self._source[int(r)] for r in rows]
        images = np.empty((len(records),) + self.image_shape, np.uint8)
        labels = np.empty((len(records),), np.int64)
        for i, record in enumerate(records):
            images[i] = record["image"]
            labels[i] = record["label"]
        check_labels(self.name, labels, self.num_classes)
        return images, labels

    def __getstate__(self):
        return {
            k: getattr(self, k)
            for k in ("dataset", "split", "data_dir", "num_classes", "name", "image_shape", "_labels")
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()
