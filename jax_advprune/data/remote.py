"""Pool files in object stores (gs://, s3://, anything fsspec speaks; see jax_advprune.storage): the merging
of byte ranges that `npz_format.read_rows_ranged` fetches in one batch of concurrent requests.

A batch asks for scattered rows of an npz member. Runs of consecutive rows become
byte ranges; ranges closer than `gap_bytes` are merged (reading a few unneeded
rows costs less than another request's round trip); the merged ranges go out at
once through fsspec's `cat_ranges`, which gcsfs issues concurrently.
"""

from __future__ import annotations

import numpy as np

DEFAULT_GAP_BYTES = 256 * 1024  # about 80 rows of 32x32x3 images: cheaper to read than a request (~1 ms on GCS)


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
