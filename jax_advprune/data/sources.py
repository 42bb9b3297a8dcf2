"""Random-access image sources over global pool indices.

The on-disk format is the one of DM-Improves-AT's generated pools: an uncompressed
`np.savez` archive with `image` (uint8, N x H x W x C) and `label` (integer, N),
read row by row with positional reads (`npz_format`), so a 50M-image pool costs
no RAM until rows are gathered. Other parts (TFDS, `tfds_source.py`) follow the
same `PoolPart` protocol; CIFAR tarballs are converted to npz once (`cifar.py`).

A pool is `[original training split ; synthetic parts]`, concatenated in file order.
Every per-sample array of the project (scores, keep mask, eps) is indexed by that
global position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jax_advprune import storage
from jax_advprune.data.npz_format import (
    IMAGE_KEY,
    LABEL_KEY,
    NpzMember,
    PoolFormatError,
    locate_npz_member,
    read_rows,
    read_rows_ranged,
)

_LABEL_CHECK_ROWS = 1 << 20  # labels are range-checked this many at a time (flat memory)


class PoolPart(Protocol):
    """One source of a pool: `len` rows of `image_shape` uint8 images with labels."""

    name: str
    image_shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Strictly increasing rows (M,) -> images (M, H, W, C) uint8, labels (M,) int64."""

    def labels(self) -> np.ndarray:
        """All labels (N,) int64."""


def check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    """Raises PoolFormatError naming `name` when a label lies outside [0, num_classes)."""
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise PoolFormatError(f"{name}: 'label' values span [{low}, {high}], expected [0, {num_classes})")


class NpzPart:
    """One npz file of a pool, read with positional reads: `image` (N, H, W, C) uint8, `label` (N,).

    Nothing is mapped or kept in memory: a batch costs one read per run of
    consecutive rows, so resident memory does not grow with the pool.
    """

    def __init__(self, path: str, num_classes: int):
        self.path = self.name = path
        self.num_classes = num_classes
        self._open()
        self._validate()

    def _open(self):
        self._remote = storage.is_remote(self.path)
        if not storage.exists(self.path):
            raise FileNotFoundError(f"pool file {self.path} does not exist")
        self._image = locate_npz_member(self.path, IMAGE_KEY)
        self._label = locate_npz_member(self.path, LABEL_KEY)
        self._fd = None if self._remote else os.open(self.path, os.O_RDONLY)

    def _rows(self, member: NpzMember, rows: np.ndarray) -> np.ndarray:
        """Rows of `member`: positional reads of the local file, or coalesced ranged reads of a remote one."""
        return read_rows_ranged(member, rows) if self._remote else read_rows(self._fd, member, rows)

    def _validate(self):
        image, label = self._image, self._label
        if image.dtype != np.uint8:
            raise PoolFormatError(f"{self.path}: 'image' has dtype {image.dtype}, expected uint8 in [0, 255]")
        if len(image.shape) != 4:
            raise PoolFormatError(f"{self.path}: 'image' has shape {image.shape}, expected (N, H, W, C)")
        if not np.issubdtype(label.dtype, np.integer) or len(label.shape) != 1:
            raise PoolFormatError(
                f"{self.path}: 'label' has dtype {label.dtype} and shape {label.shape}, expected integer (N,)"
            )
        if label.shape[0] != image.shape[0]:
            raise PoolFormatError(f"{self.path}: {image.shape[0]} images but {label.shape[0]} labels")
        size = storage.getsize(self.path)
        for member in (image, label):
            if member.offset + member.shape[0] * member.row_bytes > size:
                raise PoolFormatError(
                    f"{self.path}: array {member.key!r} is truncated: the file ends before its {member.shape[0]} rows"
                )
        for start in range(0, len(self), _LABEL_CHECK_ROWS):
            rows = np.arange(start, min(start + _LABEL_CHECK_ROWS, len(self)))
            check_labels(self.path, self._rows(label, rows), self.num_classes)

    def __len__(self) -> int:
        return self._label.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self._image.shape[1:]

    @property
    def images(self) -> np.ndarray:
        """All images, memory-mapped (for small splits; batches go through `read`); a remote file is read whole."""
        if self._remote:
            return self._rows(self._image, np.arange(len(self)))
        return self._image.memmap()

    def labels(self) -> np.ndarray:
        """All labels (N,) int64, read into memory (8 bytes per sample)."""
        return self._rows(self._label, np.arange(len(self))).astype(np.int64)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Strictly increasing rows (M,) -> images (M, H, W, C) uint8, labels (M,) int64."""
        return self._rows(self._image, rows), self._rows(self._label, rows).astype(np.int64)

    def __del__(self):
        fd = getattr(self, "_fd", None)  # None for a remote file
        if fd is not None:
            os.close(fd)
            self._fd = None

    # Grain workers receive sources by pickling: send the path, reopen on the other side.
    def __getstate__(self):
        return {"path": self.path, "num_classes": self.num_classes}

    def __setstate__(self, state):
        self.path = self.name = state["path"]
        self.num_classes = state["num_classes"]
        self._open()


class Pool:
    """Parts read as one array in order: global index i -> (part, row).

    `num_original` leading rows are the original training split; the rest are
    synthetic.
    """

    def __init__(self, parts: Sequence[PoolPart], num_original: int):
        if not parts:
            raise ValueError("a pool needs at least one part")
        shapes = {tuple(p.image_shape) for p in parts}
        if len(shapes) != 1:
            detail = ", ".join(f"{p.name}: {tuple(p.image_shape)}" for p in parts)
            raise PoolFormatError(f"pool parts disagree on the image shape: {detail}")
        self.parts = list(parts)
        self.num_original = int(num_original)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.image_shape = tuple(self.parts[0].image_shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def is_synthetic(self) -> np.ndarray:
        """(N,) bool: True for rows after the original split."""
        return np.arange(len(self)) >= self.num_original

    def labels(self) -> np.ndarray:
        """All labels (N,) int64, read into memory (8 bytes per sample)."""
        return np.concatenate([p.labels() for p in self.parts])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gathers rows at global `indices` (M,) -> images (M, H, W, C) uint8, labels (M,) int64.

        Each part is read once per distinct row, in increasing order (sequential-ish
        disk access); rows come back in the order asked for, repeats included.
        """
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"pool index out of range [0, {len(self)}): {indices.min()}..{indices.max()}")
        images = np.empty((len(indices),) + self.image_shape, np.uint8)
        labels = np.empty((len(indices),), np.int64)
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for part_id in np.unique(part_of):
            where = np.flatnonzero(part_of == part_id)
            rows, inverse = np.unique(indices[where] - self.offsets[part_id], return_inverse=True)
            part_images, part_labels = self.parts[part_id].read(rows)
            images[where] = part_images[inverse]
            labels[where] = part_labels[inverse]
        return images, labels


def open_pool(original: str | PoolPart, synthetic: Sequence[str], num_classes: int) -> Pool:
    """Pool of the original split (an npz path or an opened part) followed by synthetic npz parts, in order."""
    first = NpzPart(original, num_classes) if isinstance(original, str) else original
    parts = [first] + [NpzPart(p, num_classes) for p in synthetic]
    return Pool(parts, num_original=len(first))
