"""Pool files in a bucket (gs://, against a local GCS emulator) read the same rows as on disk, with coalesced ranged reads."""

import pickle

import numpy as np

from conftest import make_npz
from jax_advprune.data import remote
from jax_advprune.data.sources import open_pool


def test_coalesced_ranges_cover_every_range_and_merge_only_small_gaps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        edges = np.sort(rng.choice(10_000, size=2 * rng.integers(1, 40), replace=False))
        starts, ends = edges[0::2], edges[1::2]
        gap = int(rng.integers(0, 500))
        merged_starts, merged_ends = remote.coalesce(starts, ends, gap)
        which = np.searchsorted(merged_starts, starts, side="right") - 1
        assert np.all(merged_starts[which] <= starts) and np.all(ends <= merged_ends[which])  # each range inside one merged range
        assert np.all(merged_starts[1:] - merged_ends[:-1] > gap)  # what stays apart is farther than the gap
        assert len(merged_starts) <= len(starts) and merged_starts[0] == starts[0] and merged_ends[-1] == ends[-1]


def test_a_pool_in_a_bucket_reads_the_rows_and_labels_of_the_same_pool_on_disk(gcs_bucket, tmp_path):
    make_npz(tmp_path / "orig.npz", 60, shape=(8, 8, 3), seed=1)
    make_npz(tmp_path / "syn.npz", 500, shape=(8, 8, 3), seed=2, offset=60)
    fs = remote.filesystem(gcs_bucket)
    for name in ("orig.npz", "syn.npz"):
        fs.put(str(tmp_path / name), f"{gcs_bucket}/pool/{name}")
    local = open_pool(str(tmp_path / "orig.npz"), [str(tmp_path / "syn.npz")], 10)
    in_bucket = open_pool(f"{gcs_bucket}/pool/orig.npz", [f"{gcs_bucket}/pool/syn.npz"], 10)
    assert len(in_bucket) == len(local) == 560 and in_bucket.image_shape == local.image_shape
    np.testing.assert_array_equal(in_bucket.labels(), local.labels())
    rng = np.random.default_rng(3)
    for size in (1, 7, 64, 300):  # scattered rows: some merged into one range, some apart
        rows = np.sort(rng.choice(560, size=size, replace=False))
        for got, expected in zip(in_bucket.read(rows), local.read(rows)):
            np.testing.assert_array_equal(got, expected)
    reopened = pickle.loads(pickle.dumps(in_bucket))  # what grain workers receive
    np.testing.assert_array_equal(reopened.read(np.arange(50, 70))[0], local.read(np.arange(50, 70))[0])
