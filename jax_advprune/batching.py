"""Fixed-shape batching of index ranges, so jitted functions compile once."""

from __future__ import annotations

import numpy as np


def padded_batches(n: int, batch_size: int):
    """Yields (indices (batch_size,), valid (batch_size,) bool) covering range(n) in order.

    The last batch is padded with index 0 and valid=False.
    """
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        yield np.where(valid, idx, 0), valid
