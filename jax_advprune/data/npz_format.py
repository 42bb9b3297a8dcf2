"""The DM-Improves-AT npz format on disk: memory-mapped and positional reads, streaming writes.

A pool file is an uncompressed `np.savez` archive with `image` (uint8, N x H x W x C)
and `label` (integer, N). Because the members are stored, each array is a plain
.npy byte range inside the zip: `locate_npz_member` finds it, `read_rows` reads any
rows of it with positional reads (no mapping, so nothing stays resident), and
`NpzStreamWriter` writes such a file chunk by chunk with flat memory.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from jax_advprune import storage
from jax_advprune.data import remote
from jax_advprune.errors import UserError
from jax_advprune.storage import atomic_output

IMAGE_KEY = "image"
LABEL_KEY = "label"


class PoolFormatError(UserError, ValueError):
    """A pool file does not hold what the DM-Improves-AT format promises."""


@dataclasses.dataclass(frozen=True)
class NpzMember:
    """Where one array of an uncompressed npz lies: byte `offset` of row 0 in `path`."""

    path: str
    key: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def memmap(self) -> np.ndarray:
        """The whole array, memory-mapped read-only (zeros of the shape when empty)."""
        if int(np.prod(self.shape)) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def locate_npz_member(path: str, key: str) -> NpzMember:
    """Finds array `key` of the uncompressed npz at `path` without reading it.

    Raises PoolFormatError naming the file and key when the member is missing,
    compressed, or not a plain (non-object, C-order) .npy array.
    """
    member = f"{key}.npy"
    with storage.open_file(path, "rb") as handle:
        return _locate_in(handle, path, key, member)


def _locate_in(handle, path: str, key: str, member: str) -> NpzMember:
    """locate_npz_member on `handle`, an open binary file of `path`."""
    try:
        archive = zipfile.ZipFile(handle)
    except zipfile.BadZipFile as error:
        raise PoolFormatError(
            f"{path}: not a readable npz (zip) file ({error}); truncated or not written by np.savez?"
        ) from error
    with archive:  # closing the ZipFile leaves the caller's handle open
        names = archive.namelist()
        if member not in names:
            stored = sorted(n[:-4] if n.endswith(".npy") else n for n in names)
            raise PoolFormatError(
                f"{path}: no array {key!r} in the npz (it holds {stored}); expected keys 'image' and 'label'"
            )
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise PoolFormatError(
                f"{path}: array {key!r} is compressed (np.savez_compressed) and cannot be memory-mapped; "
                "rewrite it uncompressed once, e.g. "
                "`d = np.load(path); np.savez(new_path, image=d['image'], label=d['label'])`"
            )
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
    offset = handle.tell()
    if fortran_order or dtype.hasobject:
        raise PoolFormatError(
            f"{path}: array {key!r} is Fortran-ordered or of object dtype; expected a C-ordered numeric array "
            "(rewrite it with np.ascontiguousarray)"
        )
    return NpzMember(path, key, offset, tuple(shape), np.dtype(dtype))


def open_npz_member(path: str, key: str) -> np.ndarray:
    """Memory-maps array `key` of the uncompressed npz at `path` (read-only)."""
    return locate_npz_member(path, key).memmap()


def read_rows(fd: int, member: NpzMember, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (M,) of `member`, strictly increasing -> (M, *row shape) array.

    One positional read per run of consecutive rows, straight into the output, so
    a sequential chunk is one read and nothing is mapped or cached in this process.
    """
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows),) + member.shape[1:], member.dtype)
    if len(rows) == 0:
        return out
    row_bytes = member.row_bytes
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [len(rows)]]).tolist()
    first_rows = rows[starts].tolist()
    for start, end, row in zip(starts, ends, first_rows):
        done, size, position = 0, (end - start) * row_bytes, member.offset + row * row_bytes
        while done < size:
            got = os.preadv(fd, [buffer[start * row_bytes + done : end * row_bytes]], position + done)
            if got <= 0:
                raise PoolFormatError(
                    f"{member.path}: array {member.key!r} ends before row {row + (done // row_bytes)} (truncated file?)"
                )
            done += got
    return out


class NpzStreamWriter:
    """Writes an uncompressed `image`/`label` npz chunk by chunk, then renames it into place.

    Usage: `with NpzStreamWriter(path, n, image_shape) as w: w.write(images, labels)`
    repeatedly until n rows are written. Memory use is that of one chunk. The file
    appears at `path` only when all n rows were written (temp file + rename).
    """

    def __init__(self, path: str, num_rows: int, image_shape: tuple[int, ...]):
        self.path, self.num_rows, self.image_shape = path, int(num_rows), tuple(image_shape)
        self._atomic = atomic_output(path, ".npz")  # renamed into place on success, removed on failure
        self._tmp = self._atomic.__enter__()
        self._archive = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._labels: list[np.ndarray] = []
        self._written = 0
        self._images = self._archive.open(f"{IMAGE_KEY}.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": (self.num_rows,) + self.image_shape,
        }
        np.lib.format.write_array_header_1_0(self._images, header)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Appends images (m, *image_shape) uint8 and labels (m,) integer."""
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape or len(labels) != len(images):
            raise ValueError(
                f"expected uint8 images (m, {self.image_shape}) and m labels, got {images.dtype} {images.shape} and {len(labels)} labels"
            )
        if self._written + len(images) > self.num_rows:
            raise ValueError(f"{self.path}: more than the announced {self.num_rows} rows")
        self._images.write(memoryview(np.ascontiguousarray(images)).cast("B"))
        self._labels.append(np.asarray(labels, np.int64))
        self._written += len(images)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        short = exc_type is None and self._written != self.num_rows
        self._images.close()
        if exc_type is None and not short:
            with self._archive.open(f"{LABEL_KEY}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64))
        self._archive.close()
        if exc_type is None and not short:
            self._atomic.__exit__(None, None, None)  # renamed into place
            return False
        error = (
            exc
            if exc is not None
            else ValueError(f"{self.path}: {self._written} rows written, {self.num_rows} announced")
        )
        self._atomic.__exit__(type(error), error, None)  # the partial file removed
        if short:
            raise error
        return False


def write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes an uncompressed DM-Improves-AT npz atomically (temp file, then rename)."""
    with atomic_output(path, ".npz") as tmp:
        np.savez(tmp, **{IMAGE_KEY: np.ascontiguousarray(images), LABEL_KEY: np.ascontiguousarray(labels, np.int64)})


def read_rows_ranged(member: NpzMember, rows: np.ndarray, gap_bytes: int = remote.DEFAULT_GAP_BYTES) -> np.ndarray:
    """`read_rows` for a member of a remote file (gs://...): rows `rows` (M,) strictly increasing -> (M, *row shape),
    their byte ranges merged when less than `gap_bytes` apart and fetched in one batch of concurrent requests."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows),) + member.shape[1:], member.dtype)
    if len(rows) == 0:
        return out
    row_bytes = member.row_bytes
    row_starts = member.offset + rows * row_bytes
    range_starts, range_ends = remote.coalesce(row_starts, row_starts + row_bytes, gap_bytes)
    blobs = storage.filesystem(member.path).cat_ranges(
        [member.path] * len(range_starts), range_starts.tolist(), range_ends.tolist()
    )
    # Rows and ranges are both sorted, so the rows of range i are one slice of `rows`.
    bounds = np.searchsorted(row_starts, np.concatenate([range_starts, [np.iinfo(np.int64).max]]))
    flat = out.reshape(len(rows), -1).view(np.uint8)
    for i, blob in enumerate(blobs):
        if len(blob) != range_ends[i] - range_starts[i]:
            raise PoolFormatError(
                f"{member.path}: array {member.key!r} ends before row {rows[bounds[i + 1] - 1]} (truncated file?)"
            )
        members = slice(bounds[i], bounds[i + 1])
        local = (row_starts[members] - range_starts[i])[:, None] + np.arange(row_bytes)
        flat[members] = np.frombuffer(blob, np.uint8)[local]
    return out
