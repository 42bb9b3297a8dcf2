"""Sources beyond plain npz: CIFAR tarballs, TFDS, the test-pool tool, streaming writes, bad input."""

import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest

from jax_advprune.data import make_pool as make_pool_lib
from jax_advprune.data.cifar import convert_cifar_tarball
from jax_advprune.data.npz_format import NpzStreamWriter
from jax_advprune.data.sources import NpzPart, PoolFormatError, open_pool


def _write_cifar_tarball(path, layout, rng):
    """A tarball with the official layout and pickle format; returns {split: (images NHWC, labels)}."""
    if layout == "cifar10":
        top, members, key = (
            "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            b"labels",
        )
        num_classes, per_member = 10, 7
    else:
        top, members, key = "cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels"
        num_classes, per_member = 100, 23
    expected = {}
    with tarfile.open(path, "w:gz") as archive:
        for split, names in members.items():
            images, labels = [], []
            for name in names:
                data = rng.integers(0, 256, (per_member, 3072), dtype=np.uint8)
                batch_labels = rng.integers(0, num_classes, per_member).tolist()
                blob = pickle.dumps({b"data": data, key: batch_labels, b"batch_label": b"x"})
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(batch_labels)
            expected[split] = (np.concatenate(images), np.concatenate(labels))
    return expected


@pytest.mark.parametrize("layout,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_tarball_converts_once_into_the_pool_format(tmp_path, layout, num_classes):
    expected = _write_cifar_tarball(tmp_path / "c.tar.gz", layout, np.random.default_rng(0))
    out = convert_cifar_tarball(str(tmp_path / "c.tar.gz"), str(tmp_path / "data"))
    assert out["name"] == layout and out["num_classes"] == num_classes
    for split in ("train", "test"):
        part = NpzPart(out[split], num_classes)
        np.testing.assert_array_equal(part.images, expected[split][0])  # CHW rows -> HWC images
        np.testing.assert_array_equal(part.labels(), expected[split][1])
    stamp = os.stat(out["train"]).st_mtime_ns
    assert convert_cifar_tarball(str(tmp_path / "c.tar.gz"), str(tmp_path / "data")) == out
    assert os.stat(out["train"]).st_mtime_ns == stamp  # converted once


def test_cifar_converter_refuses_other_tarballs(tmp_path):
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("readme.txt")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="not a CIFAR python tarball"):
        convert_cifar_tarball(str(tmp_path / "x.tar.gz"), str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        convert_cifar_tarball(str(tmp_path / "missing.tar.gz"), str(tmp_path / "data"))


def test_tfds_split_is_a_pool_part_under_mock_data(small_pool, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jax_advprune.data.tfds_source import TfdsPart

    _, syn_images, _ = small_pool
    with tfds.testing.mock_data(num_examples=24):
        part = TfdsPart("cifar10", "train", None, 10)
        source = tfds.data_source("cifar10", split="train")
        records = [source[i] for i in range(24)]
        images = np.stack([r["image"] for r in records])
        labels = np.array([int(r["label"]) for r in records])
        assert len(part) == 24 and part.image_shape == (32, 32, 3)
        np.testing.assert_array_equal(part.labels(), labels)
        got_images, got_labels = part.read(np.array([3, 7, 20]))
        np.testing.assert_array_equal(got_images, images[[3, 7, 20]])
        np.testing.assert_array_equal(got_labels, labels[[3, 7, 20]])
        clone = pickle.loads(pickle.dumps(part))  # what grain workers receive
        np.testing.assert_array_equal(clone.read(np.array([5]))[0], images[[5]])
        # the TFDS split comes first in a pool, npz parts follow
        path = str(tmp_path / "syn.npz")
        make_pool_lib.make_pool(path, 10, image_shape=(32, 32, 3))
        pool = open_pool(part, [path], 10)
        pool_images, pool_labels = pool.read(np.array([23, 24, 1]))
        np.testing.assert_array_equal(pool_images[[0, 2]], images[[23, 1]])
        np.testing.assert_array_equal(pool_images[1], NpzPart(path, 10).images[0])
        with pytest.raises(PoolFormatError, match="100 classes"):
            TfdsPart("cifar100", "train", None, 10)


def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from jax_advprune.data.tfds_source import DatasetNotPreparedError, TfdsPart

    start = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError, match="tfds build cifar10 --file_format=array_record"):
        TfdsPart("cifar10", "train", str(tmp_path / "no_tfds"), 10)
    assert time.perf_counter() - start < 10  # no download retry loop


def test_make_pool_writes_a_valid_deterministic_multi_part_pool(tmp_path):
    make_pool_lib.main(
        ["--size", "1001", "--parts", "3", "--out", str(tmp_path / "a" / "pool.npz"), "--image-shape", "8,8,3"]
    )
    paths = [str(tmp_path / "a" / f"pool_part{i}.npz") for i in (1, 2, 3)]
    pool = open_pool(paths[0], paths[1:], 10)  # validates every part
    assert len(pool) == 1001 and pool.image_shape == (8, 8, 3)
    for path in paths:
        labels = np.load(path)["label"]
        assert np.all(np.diff(labels) >= 0) and np.ptp(np.bincount(labels, minlength=10)) <= 1
    again = make_pool_lib.make_pool(str(tmp_path / "b" / "pool.npz"), 1001, parts=3, image_shape=(8, 8, 3))
    for first, second in zip(paths, again):
        with open(first, "rb") as f, open(second, "rb") as g:
            assert f.read() == g.read()


def test_stream_writer_round_trips_and_leaves_nothing_when_short(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    path = str(tmp_path / "s.npz")
    with NpzStreamWriter(path, 10, (4, 4, 3)) as writer:
        writer.write(images[:3], labels[:3])
        writer.write(images[3:], labels[3:])
    loaded = np.load(path)
    np.testing.assert_array_equal(loaded["image"], images)
    np.testing.assert_array_equal(loaded["label"], labels)
    short = str(tmp_path / "short.npz")
    with pytest.raises(ValueError, match="3 rows written, 10 announced"):
        with NpzStreamWriter(short, 10, (4, 4, 3)) as writer:
            writer.write(images[:3], labels[:3])
    assert os.listdir(tmp_path) == ["s.npz"]


def test_truncated_pool_file_is_refused(tmp_path):
    path = str(tmp_path / "t.npz")
    make_pool_lib.make_pool(path, 50, image_shape=(8, 8, 1))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(PoolFormatError, match="not a readable npz") as err:
        NpzPart(path, 10)
    assert path in str(err.value)
