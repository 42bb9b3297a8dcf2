"""Sources and loader: memory-mapped round trips, bad input, masks, mixing, resume."""

import json
import multiprocessing
import os
import pickle
import signal
import time
import zipfile

import numpy as np
import pytest
from conftest import make_npz

from jax_advprune.data.generate import write_embedded_default, write_held_out_generated
from jax_advprune.data.loader import (
    BatchReader,
    EmptySelectionError,
    apply_augmentation,
    batch_iterator,
    draw_augmentation,
    make_plan,
)
from jax_advprune.data.npz_format import open_npz_member
from jax_advprune.data.sources import NpzPart, PoolFormatError


def test_npz_member_is_memory_mapped_and_round_trips(tmp_path):
    images, labels = make_npz(tmp_path / "p.npz", 33)
    mapped = open_npz_member(str(tmp_path / "p.npz"), "image")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(open_npz_member(str(tmp_path / "p.npz"), "label"), labels)


def test_pool_reads_across_part_boundaries_in_any_order(small_pool):
    pool, images, labels = small_pool
    assert len(pool) == 200 and pool.num_original == 60
    idx = np.array([199, 0, 59, 60, 149, 150, 151, 61, 0, 120])
    got_images, got_labels = pool.read(idx)
    np.testing.assert_array_equal(got_images, images[idx])
    np.testing.assert_array_equal(got_labels, labels[idx])
    np.testing.assert_array_equal(pool.labels(), labels)
    np.testing.assert_array_equal(pool.is_synthetic, np.arange(200) >= 60)


def test_pool_part_survives_pickling_without_copying_the_array(small_pool):
    pool, images, _ = small_pool
    blob = pickle.dumps(pool)
    assert len(blob) < 2000  # paths, not pixels
    np.testing.assert_array_equal(pickle.loads(blob).read(np.arange(200))[0], images)


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"image": np.zeros((4, 8, 8, 1), np.uint8)}, "no array 'label'"),
        ({"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int64)}, "expected uint8"),
        ({"image": np.zeros((4, 8, 8), np.uint8), "label": np.zeros(4, np.int64)}, "expected (N, H, W, C)"),
        ({"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.zeros(5, np.int64)}, "4 images but 5 labels"),
        ({"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.array([0, 1, 2, 10])}, "expected [0, 10)"),
    ],
)
def test_bad_pool_files_get_errors_naming_file_and_key(tmp_path, arrays, message):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(PoolFormatError) as err:
        NpzPart(path, num_classes=10)
    assert message in str(err.value) and path in str(err.value)


def test_compressed_npz_is_refused_with_conversion_hint(tmp_path):
    path = str(tmp_path / "compressed.npz")
    np.savez_compressed(path, image=np.zeros((4, 8, 8, 1), np.uint8), label=np.zeros(4, np.int64))
    with pytest.raises(PoolFormatError, match="compressed.*np.savez"):
        NpzPart(path, num_classes=10)
    with zipfile.ZipFile(path) as archive:  # untouched
        assert archive.getinfo("image.npy").compress_type == zipfile.ZIP_DEFLATED


def _all_indices(reader, steps):
    return np.concatenate([reader(s)["index"] for s in range(steps)])


def test_loader_never_yields_masked_out_indices_and_honours_mix_ratio(small_pool):
    pool, _, _ = small_pool
    keep = np.random.default_rng(0).random(200) < 0.4
    eps = np.linspace(0, 1, 200).astype(np.float32)
    plan = make_plan(keep, 60, batch_size=20, original_fraction=0.3, synthetic_with_replacement=True, seed=3)
    reader = BatchReader(pool, plan, eps)
    for step in range(3 * plan.steps_per_epoch):
        batch = reader(step)
        assert keep[batch["index"]].all()
        assert (batch["index"] < 60).sum() == 6  # 30% of 20, every batch
        np.testing.assert_array_equal(batch["eps"], eps[batch["index"]])
    assert plan.steps_per_epoch == 3  # ceil(60 originals / batch 20), whatever the mask keeps
    # kept originals are streamed as permutations: every one is seen before any repeats
    kept_originals = np.flatnonzero(keep[:60])
    steps = -(-len(kept_originals) // 6)
    originals = _all_indices(reader, steps)
    originals = originals[originals < 60][: len(kept_originals)]
    assert sorted(originals) == sorted(kept_originals)


def test_loader_round_trips_images_and_labels_exactly(small_pool):
    pool, images, labels = small_pool
    keep = np.ones(200, bool)
    plan = make_plan(keep, 60, batch_size=16, original_fraction=None, synthetic_with_replacement=False, seed=0)
    reader = BatchReader(pool, plan, np.zeros(200, np.float32))  # no augmentation
    seen = []
    for step in range(plan.steps_per_epoch):
        batch = reader(step)
        np.testing.assert_array_equal(batch["image"], images[batch["index"]])
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
        seen.append(batch["index"])
    assert set(np.concatenate(seen)) == set(range(200))  # a plain epoch visits every kept sample


def test_process_shares_are_disjoint_and_cover_the_global_batch(small_pool):
    pool, _, _ = small_pool
    keep = np.ones(200, bool)
    plan = make_plan(keep, 60, batch_size=20, original_fraction=None, synthetic_with_replacement=False, seed=0)
    shares = [
        BatchReader(pool, plan, np.zeros(200, np.float32), process_index=i, process_count=2)(5)["index"]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(shares), plan.indices(5))


def test_grain_iterator_resumes_with_identical_batches(small_pool):
    pool, _, _ = small_pool
    keep = np.ones(200, bool)
    plan = make_plan(keep, 60, batch_size=16, original_fraction=0.25, synthetic_with_replacement=True, seed=1)
    reader = BatchReader(pool, plan, np.zeros(200, np.float32), crop_padding=2, flip=True)
    reference = [next(it)["image"] for it in [batch_iterator(reader, 10)] for _ in range(10)]
    it = batch_iterator(reader, 10)
    for _ in range(4):
        next(it)
    state = it.get_state()
    resumed = batch_iterator(reader, 10)
    resumed.set_state(state)
    for step in range(4, 10):
        np.testing.assert_array_equal(next(resumed)["image"], reference[step])


def test_empty_selection_and_impossible_mix_are_refused():
    with pytest.raises(EmptySelectionError):
        make_plan(np.zeros(10, bool), 5, batch_size=4, original_fraction=None, synthetic_with_replacement=True, seed=0)
    keep = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    with pytest.raises(EmptySelectionError, match="0 synthetic"):
        make_plan(keep, 5, batch_size=4, original_fraction=0.5, synthetic_with_replacement=True, seed=0)


def test_augmentation_is_a_shifted_crop_of_the_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(32, 6, 6, 1), dtype=np.uint8)  # no zeros, so padding is visible
    draws = draw_augmentation(np.random.default_rng(1), len(images), crop_padding=2, flip=True)
    out = apply_augmentation(images, draws, crop_padding=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    for img, aug in zip(images, out):
        padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
        candidates = [padded[dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        assert any(np.array_equal(aug, c) for c in candidates)


def test_embedded_default_is_deterministic_and_never_overwritten(tmp_path):
    a = write_embedded_default(str(tmp_path / "a"), image_size=16, synthetic_size=300, test_fraction=0.15, seed=0)
    b = write_embedded_default(str(tmp_path / "b"), image_size=16, synthetic_size=300, test_fraction=0.15, seed=0)
    for key in a:
        da, db = np.load(a[key]), np.load(b[key])
        np.testing.assert_array_equal(da["image"], db["image"])
        np.testing.assert_array_equal(da["label"], db["label"])
    synthetic = NpzPart(a["synthetic"], 10)
    assert synthetic.images.shape == (300, 16, 16, 1) and np.all(np.diff(synthetic.labels()) >= 0)
    mtime = os.path.getmtime(a["train"])
    with pytest.raises(ValueError, match="use a new --workdir"):
        write_embedded_default(str(tmp_path / "a"), image_size=16, synthetic_size=400, test_fraction=0.15, seed=0)
    assert os.path.getmtime(a["train"]) == mtime


def test_the_held_out_generated_split_is_the_pool_s_generator_with_other_draws_and_never_a_pool_image(tmp_path):
    data_dir = str(tmp_path / "data")
    paths = write_embedded_default(data_dir, image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0)
    held_out_path = write_held_out_generated(
        data_dir, size=1003, image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0
    )
    held_out, pool = NpzPart(held_out_path, 10), NpzPart(paths["synthetic"], 10)
    train = NpzPart(paths["train"], 10)
    images, labels = held_out.read(np.arange(len(held_out)))
    # Balanced as the pool is (size // 10 per class, the remainder to the first classes), sorted by class.
    assert images.shape == (1003, 16, 16, 1) and list(np.bincount(labels)) == [101, 101, 101] + [100] * 7
    # Never an image of the pool or of the train split, byte for byte.
    seen = {row.tobytes() for row in np.concatenate([pool.images, train.images]).reshape(-1, 256)}
    assert not any(row.tobytes() in seen for row in images.reshape(-1, 256))

    # The same generator: per class, the mean held-out image is much nearer the pool's mean of that class than the
    # pool's class means are to one another.
    def class_means(x, y):
        return np.stack([x[y == c].reshape(-1, 256).astype(float).mean(0) for c in range(10)])

    ours, theirs = class_means(images, labels), class_means(pool.images, pool.labels())
    between = np.linalg.norm(theirs[:, None] - theirs[None], axis=-1)[~np.eye(10, dtype=bool)].min()
    assert np.linalg.norm(ours - theirs, axis=-1).max() < between / 4
    # Deterministic: another directory, the same images.
    write_embedded_default(str(tmp_path / "again"), image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0)
    again = write_held_out_generated(
        str(tmp_path / "again"), size=1003, image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0
    )
    np.testing.assert_array_equal(NpzPart(again, 10).images, images)
    meta = json.load(open(os.path.join(data_dir, "generated_test_meta.json")))
    assert meta["num_test"] == 1003 and meta["draw_seed"] != 0
    with pytest.raises(ValueError, match="use a new --workdir"):
        write_held_out_generated(data_dir, size=500, image_size=16, synthetic_size=2000, test_fraction=0.15, seed=0)


def test_plain_epochs_are_seeded_permutations_of_the_kept_pool(small_pool):
    pool, _, _ = small_pool
    keep = np.random.default_rng(1).random(200) < 0.6
    kept = np.flatnonzero(keep)
    plan = make_plan(keep, 60, batch_size=len(kept), original_fraction=None, synthetic_with_replacement=False, seed=5)
    epochs = [np.sort(plan.indices(e)) for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(epoch, kept)  # each epoch visits every kept sample once
    orders = [plan.indices(e) for e in range(3)]
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch
    same = make_plan(keep, 60, batch_size=len(kept), original_fraction=None, synthetic_with_replacement=False, seed=5)
    np.testing.assert_array_equal(same.indices(2), orders[2])  # a pure function of (seed, epoch)


def test_two_processes_cover_the_kept_pool_over_an_epoch(small_pool):
    pool, _, _ = small_pool
    keep = np.random.default_rng(2).random(200) < 0.3
    plan = make_plan(keep, 60, batch_size=8, original_fraction=None, synthetic_with_replacement=False, seed=0)
    readers = [BatchReader(pool, plan, np.zeros(200, np.float32), process_index=i, process_count=2) for i in range(2)]
    epoch_rows = plan.steps_per_epoch * plan.batch_size
    shares = [_all_indices(r, plan.steps_per_epoch) for r in readers]
    first_pass = np.concatenate([plan.indices(s) for s in range(plan.steps_per_epoch)])[: keep.sum()]
    assert sorted(first_pass) == sorted(np.flatnonzero(keep))
    assert len(shares[0]) + len(shares[1]) == epoch_rows
    assert set(shares[0]) | set(shares[1]) == set(np.flatnonzero(keep))
    for step in range(plan.steps_per_epoch):  # disjoint within every global batch
        a, b = (r(step)["index"] for r in readers)
        assert not set(a) & set(b) or len(set(plan.indices(step))) < plan.batch_size
        np.testing.assert_array_equal(np.concatenate([a, b]), plan.indices(step))  # positional halves, repeats included


def test_two_worker_processes_yield_the_same_batches_as_none_and_leave_sigterm_to_the_main_process(small_pool):
    pool, _, _ = small_pool
    keep = np.random.default_rng(3).random(200) < 0.5
    plan = make_plan(keep, 60, batch_size=16, original_fraction=0.25, synthetic_with_replacement=True, seed=2)
    reader = BatchReader(pool, plan, np.linspace(0, 1, 200).astype(np.float32), crop_padding=2, flip=True)
    single = list(batch_iterator(reader, 6))
    before = set(multiprocessing.active_children())
    batches = batch_iterator(reader, 6, num_workers=2)
    multi = [next(batches), next(batches)]  # one from each worker: both have started (and set their SIGTERM handling)
    workers = [child for child in multiprocessing.active_children() if child not in before]
    assert len(workers) == 2
    for worker in workers:  # a preemption signalled to the process group: the workers leave it to this process
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    multi += list(batches)
    assert len(multi) == 6
    for a, b in zip(single, multi):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_keep_and_eps_arrays_must_match_the_pool(small_pool):
    pool, _, _ = small_pool
    plan = make_plan(
        np.ones(150, bool), 60, batch_size=8, original_fraction=None, synthetic_with_replacement=False, seed=0
    )
    with pytest.raises(ValueError, match="keep mask has 150 entries.*pool of 200 samples.*orig.npz"):
        BatchReader(pool, plan, np.zeros(200, np.float32))
    plan = make_plan(
        np.ones(200, bool), 60, batch_size=8, original_fraction=None, synthetic_with_replacement=False, seed=0
    )
    with pytest.raises(ValueError, match=r"eps array has shape \(199,\).*\(200,\) expected"):
        BatchReader(pool, plan, np.zeros(199, np.float32))


def test_a_run_on_a_bad_pool_fails_before_touching_anything(tmp_path):
    from configs import default
    from jax_advprune.main import run
    from jax_advprune.validate import ConfigError

    make_npz(tmp_path / "orig.npz", 20, shape=(8, 8, 1))
    make_npz(tmp_path / "test.npz", 10, shape=(8, 8, 1))
    np.savez(tmp_path / "syn.npz", image=np.zeros((5, 8, 8, 1), np.uint8), label=np.array([0, 1, 2, 3, 12]))
    before = {p: (tmp_path / p).read_bytes() for p in ("orig.npz", "test.npz", "syn.npz")}
    config = default.get_config("smoke")
    config.data.name, config.num_devices = "npz", 1
    config.data.original, config.data.test, config.data.synthetic = (
        str(tmp_path / "orig.npz"),
        str(tmp_path / "test.npz"),
        [str(tmp_path / "syn.npz")],
    )
    with pytest.raises(ConfigError, match=r"syn.npz: 'label' values span \[0, 12\]"):
        run(config, str(tmp_path / "work"))
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert not os.path.exists(tmp_path / "work")


def test_augmented_batches_do_not_depend_on_the_process_count(small_pool):
    pool, _, _ = small_pool
    plan = make_plan(
        np.ones(200, bool), 60, batch_size=20, original_fraction=0.3, synthetic_with_replacement=True, seed=4
    )
    whole = BatchReader(pool, plan, np.zeros(200, np.float32), crop_padding=2, flip=True)(3)
    halves = [
        BatchReader(pool, plan, np.zeros(200, np.float32), crop_padding=2, flip=True, process_index=i, process_count=2)(
            3
        )
        for i in range(2)
    ]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
