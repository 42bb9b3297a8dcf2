"""Pool files in object stores (gs://, s3://, anything fsspec speaks): the filesystem of a URL, and the merging
of byte ranges that `npz_format.read_rows_ranged` fetches in one batch of concurrent requests.

A batch asks for scattered rows of an npz member. Runs of consecutive rows become
byte ranges; ranges closer than `gap_bytes` are merged (reading a few unneeded
rows costs less than another request's round trip); the merged ranges go out at
once through fsspec's `cat_ranges`, which gcsfs issues concurrently.
"""

from __future__ import annotations

import functools

import numpy as np

DEFAULT_GAP_BYTES = 256 * 1024  # about 80 rows of 32x32x3 images: cheaper to read than a request (~1 ms on GCS)


def is_remote(path: str) -> bool:
    """True for a URL with a scheme other than file:// (gs://bucket/pool.npz)."""
    return "://" in path and not path.startswith("file://")


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
    import fsspec

    return fsspec.filesystem(protocol)


def filesystem(path: str):
    """The fsspec filesystem of `path` (gcsfs for gs://; one instance per protocol and process)."""
    return _filesystem(path.split("://", 1)[0])


def exists(path: str) -> bool:
    return filesystem(path).exists(path)


def size(path: str) -> int:
    return int(filesystem(path).size(path))


def open_binary(path: str):
    """A seekable binary file object (for reading the zip directory and .npy headers)."""
    return filesystem(path).open(path, "rb")


def coalesce(starts: np.ndarray, ends: np.ndarray, gap_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges [starts[i], ends[i]) sorted and disjoint -> merged ranges (K,), (K,): neighbours whose gap is at
    most `gap_bytes` become one range."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    if len(starts) == 0:
        return starts, ends
    new_range = np.concatenate([[True], starts[1:] - ends[:-1] > gap_bytes])
    first = np.flatnonzero(new_range)
    last = np.concatenate([first[1:], [len(starts)]]) - 1
    return starts[first], ends[last]
