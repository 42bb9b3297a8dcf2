"""Random-access image sources over global pool indices, memory-mapped from npz files.

The on-disk format is the one of DM-Improves-AT's generated pools: an uncompressed
`np.savez` archive with `image` (uint8, N x H x W x C) and `label` (integer, N).
`open_npz_member` memory-maps one member inside the zip without reading it, so a
50M-image pool costs no RAM until rows are gathered.

A pool is `[original training split ; synthetic parts]`, concatenated in file order.
Every per-sample array of the project (scores, keep mask, eps) is indexed by that
global position.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Sequence

import numpy as np

IMAGE_KEY = "image"
LABEL_KEY = "label"


class PoolFormatError(ValueError):
    """A pool file does not hold what the DM-Improves-AT format promises."""


def open_npz_member(path: str, key: str) -> np.memmap:
    """Memory-maps array `key` of the uncompressed npz at `path` (read-only).

    Raises PoolFormatError naming the file and key when the member is missing,
    compressed, or not a plain (non-object, C-order) .npy array.
    """
    member = f"{key}.npy"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if member not in names:
            stored = sorted(n[:-4] if n.endswith(".npy") else n for n in names)
            raise PoolFormatError(f"{path}: no array {key!r} in the npz (it holds {stored}); expected keys 'image' and 'label'")
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise PoolFormatError(
                f"{path}: array {key!r} is compressed (np.savez_compressed) and cannot be memory-mapped; "
                "rewrite it uncompressed once, e.g. "
                "`d = np.load(path); np.savez(new_path, image=d['image'], label=d['label'])`"
            )
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)
        if local_header[:4] != b"PK\x03\x04":
            raise PoolFormatError(f"{path}: corrupt zip local header for {key!r}")
        name_len = int.from_bytes(local_header[26:28], "little")
        extra_len = int.from_bytes(local_header[28:30], "little")
        handle.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise PoolFormatError(f"{path}: array {key!r} uses .npy format {version}, expected 1.0 or 2.0")
        data_offset = handle.tell()
    if fortran_order or dtype.hasobject:
        raise PoolFormatError(f"{path}: array {key!r} is Fortran-ordered or of object dtype; expected a C-ordered numeric array "
            "(rewrite it with np.ascontiguousarray)")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape)


@dataclasses.dataclass
class NpzPart:
    """One npz file of a pool: memory-mapped `image` (N, H, W, C) uint8 and `label` (N,)."""

    path: str
    num_classes: int
    images: np.ndarray = dataclasses.field(init=False, repr=False)
    labels: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._open()
        self._validate()

    def _open(self):
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"pool file {self.path} does not exist")
        self.images = open_npz_member(self.path, IMAGE_KEY)
        self.labels = open_npz_member(self.path, LABEL_KEY)

    def _validate(self):
        if self.images.dtype != np.uint8:
            raise PoolFormatError(f"{self.path}: 'image' has dtype {self.images.dtype}, expected uint8 in [0, 255]")
        if self.images.ndim != 4:
            raise PoolFormatError(f"{self.path}: 'image' has shape {self.images.shape}, expected (N, H, W, C)")
        if not np.issubdtype(self.labels.dtype, np.integer) or self.labels.ndim != 1:
            raise PoolFormatError(f"{self.path}: 'label' has dtype {self.labels.dtype} and shape {self.labels.shape}, expected integer (N,)")
        if len(self.labels) != len(self.images):
            raise PoolFormatError(f"{self.path}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels):
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= self.num_classes:
                raise PoolFormatError(f"{self.path}: 'label' values span [{low}, {high}], expected [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.labels)

    # np.memmap copies its whole array when pickled (grain workers pickle sources):
    # drop the maps and reopen them on the other side.
    def __getstate__(self):
        return {"path": self.path, "num_classes": self.num_classes}

    def __setstate__(self, state):
        self.path, self.num_classes = state["path"], state["num_classes"]
        self._open()


class Pool:
    """Parts read as one array in order: global index i -> (part, row).

    `num_original` leading rows are the original training split; the rest are synthetic.
    """

    def __init__(self, parts: Sequence[NpzPart], num_original: int):
        if not parts:
            raise ValueError("a pool needs at least one part")
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) != 1:
            detail = ", ".join(f"{p.path}: {p.images.shape[1:]}" for p in parts)
            raise PoolFormatError(f"pool parts disagree on the image shape: {detail}")
        self.parts = list(parts)
        self.num_original = int(num_original)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.image_shape = tuple(self.parts[0].images.shape[1:])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def is_synthetic(self) -> np.ndarray:
        """(N,) bool: True for rows after the original split."""
        return np.arange(len(self)) >= self.num_original

    def labels(self) -> np.ndarray:
        """All labels (N,) int64, read into memory (8 bytes per sample)."""
        return np.concatenate([np.asarray(p.labels, np.int64) for p in self.parts])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gathers rows at global `indices` (M,) -> images (M, H, W, C) uint8, labels (M,) int64.

        Reads each part with sorted indices (sequential-ish disk access) and returns
        rows in the order asked for.
        """
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"pool index out of range [0, {len(self)}): {indices.min()}..{indices.max()}")
        images = np.empty((len(indices),) + self.image_shape, np.uint8)
        labels = np.empty((len(indices),), np.int64)
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for part_id in np.unique(part_of):
            where = np.flatnonzero(part_of == part_id)
            rows = indices[where] - self.offsets[part_id]
            order = np.argsort(rows, kind="stable")
            part = self.parts[part_id]
            images[where[order]] = part.images[rows[order]]
            labels[where[order]] = part.labels[rows[order]]
        return images, labels


def open_pool(original: str, synthetic: Sequence[str], num_classes: int) -> Pool:
    """Pool of one original-split npz followed by synthetic npz parts, in the given order."""
    parts = [NpzPart(original, num_classes)] + [NpzPart(p, num_classes) for p in synthetic]
    return Pool(parts, num_original=len(parts[0]))
