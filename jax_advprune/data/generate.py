"""The embedded default data set: real handwritten digits plus a locally generated pool.

Original split: scikit-learn's `load_digits` (1,797 real 8x8 grey-level digits,
values 0..16, shipped inside scikit-learn, no download), split per class into
train and test with a fixed seed, rescaled to [0, 1], resized bilinearly to
`image_size` x `image_size` and stored as uint8 (N, S, S, 1).

Synthetic pool: a class-conditional generative model fitted to the training split
only: PCA of the 64 pixel values, then per class a Gaussian mixture in the PCA
space. Samples are decoded, clipped to [0, 1], resized like the originals and
written sorted by class, like the real diffusion-generated pools. Some samples
look like another digit or like nothing: that label noise is the point, since
real generated pools have it too.

Everything is a deterministic function of the seed and written with uncompressed
`np.savez` in the DM-Improves-AT format, so the same reader serves both.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from jax_advprune import storage
from jax_advprune.data.npz_format import write_npz
from jax_advprune.storage import atomic_output

DIGITS_CLASSES = 10


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) float images to (N, size, size), align-corners=False."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)

    def axis_weights(src: int):
        pos = (np.arange(size) + 0.5) * src / size - 0.5
        pos = np.clip(pos, 0, src - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, src - 1)
        return low, high, (pos - low).astype(np.float32)

    r0, r1, rw = axis_weights(h)
    c0, c1, cw = axis_weights(w)
    rows = images[:, r0, :] * (1 - rw)[None, :, None] + images[:, r1, :] * rw[None, :, None]
    return rows[:, :, c0] * (1 - cw)[None, None, :] + rows[:, :, c1] * cw[None, None, :]


def to_uint8_images(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Flat 8x8 intensities in [0, 1] (N, 64) -> uint8 images (N, S, S, 1)."""
    images = resize_bilinear(np.clip(pixels, 0, 1).reshape(-1, 8, 8), image_size)
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)[..., None]


def digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of sklearn digits -> (x_train (N, 64) in [0, 1], y_train, x_test, y_test).

    Both splits are sorted by class, then by original order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(DIGITS_CLASSES):
        members = np.flatnonzero(labels == c)
        chosen = rng.permutation(len(members))
        n_test = int(round(test_fraction * len(members)))
        test_idx.append(np.sort(members[chosen[:n_test]]))
        train_idx.append(np.sort(members[chosen[n_test:]]))
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    return pixels[train_idx], labels[train_idx], pixels[test_idx], labels[test_idx]


def sample_synthetic(
    x_train: np.ndarray,
    y_train: np.ndarray,
    size: int,
    seed: int,
    pca_components: int = 24,
    mixture_components: int = 6,
    sample_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fits PCA + per-class Gaussian mixtures to (x_train (N, 64), y_train) and samples.

    Returns (pixels (size, 64) in [0, 1], labels (size,) int64), sorted by class,
    with size // 10 samples per class (the remainder going to the first classes).
    The generator (PCA and mixtures) is fitted with `seed`; the draws use `seed` too
    unless `sample_seed` is given: the same generator, other samples.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    pca = PCA(n_components=pca_components, random_state=seed).fit(x_train)
    codes = pca.transform(x_train)
    per_class = np.full(DIGITS_CLASSES, size // DIGITS_CLASSES)
    per_class[: size % DIGITS_CLASSES] += 1
    rng = np.random.default_rng(seed if sample_seed is None else sample_seed)
    pixels, labels = [], []
    for c in range(DIGITS_CLASSES):
        mixture = GaussianMixture(
            n_components=mixture_components, covariance_type="full", reg_covar=1e-3, random_state=seed + c
        ).fit(codes[y_train == c])
        if sample_seed is not None:  # sklearn draws from the fitted model's random_state
            mixture.random_state = np.random.RandomState(np.random.SeedSequence([sample_seed, c]).generate_state(1)[0])
        with warnings.catch_warnings():  # numerically asymmetric covariances; harmless
            warnings.simplefilter("ignore", RuntimeWarning)
            sampled, _ = mixture.sample(int(per_class[c]))
        sampled = sampled[rng.permutation(len(sampled))]  # sklearn returns them grouped by component
        pixels.append(np.clip(pca.inverse_transform(sampled), 0, 1).astype(np.float32))
        labels.append(np.full(int(per_class[c]), c, np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


def already_written(meta_path: str, settings: dict, paths: list[str]) -> bool:
    """True when `meta_path` records `settings` and every one of `paths` exists (the files need not be written
    again); raises ValueError when it records other settings (nothing is overwritten)."""
    if not storage.exists(meta_path):
        return False
    existing = json.loads(storage.read_text(meta_path))["settings"]
    if existing != settings:
        raise ValueError(
            f"{meta_path} was written with {existing}, but the config asks for {settings}; use a new --workdir"
        )
    return all(storage.exists(p) for p in paths)


def write_embedded_default(
    data_dir: str, *, image_size: int, synthetic_size: int, test_fraction: float, seed: int
) -> dict[str, str]:
    """Writes train.npz, test.npz and synthetic.npz into data_dir once; returns their paths.

    Skips the work when the files exist and `meta.json` records the same settings;
    raises if files exist with other settings (nothing is overwritten).
    """
    settings = dict(image_size=image_size, synthetic_size=synthetic_size, test_fraction=test_fraction, seed=seed)
    paths = {name: os.path.join(data_dir, f"{name}.npz") for name in ("train", "test", "synthetic")}
    meta_path = os.path.join(data_dir, "meta.json")
    if already_written(meta_path, settings, list(paths.values())):
        return paths
    storage.makedirs(data_dir)
    x_train, y_train, x_test, y_test = digits_split(test_fraction, seed)
    write_npz(paths["train"], to_uint8_images(x_train, image_size), y_train)
    write_npz(paths["test"], to_uint8_images(x_test, image_size), y_test)
    pixels, labels = sample_synthetic(x_train, y_train, synthetic_size, seed)
    write_npz(paths["synthetic"], to_uint8_images(pixels, image_size), labels)
    with atomic_output(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(
            {"settings": settings, "num_train": len(y_train), "num_test": len(y_test), "num_synthetic": len(labels)},
            f,
            indent=2,
        )
    return paths


HELD_OUT_SPAWN_KEY = 7  # any fixed value; it only has to differ from the pool's (which uses no SeedSequence)


def held_out_sample_seed(seed: int) -> int:
    """The draw seed of the held-out generated test split for data seed `seed`: a SeedSequence stream with its own
    spawn key, disjoint from the pool's draws (which use `seed` and `seed + class`)."""
    return int(np.random.SeedSequence(seed, spawn_key=(HELD_OUT_SPAWN_KEY,)).generate_state(1)[0])


def _row_keys(images: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in images.reshape(len(images), -1)}


def write_held_out_generated(
    data_dir: str, *, size: int, image_size: int, synthetic_size: int, test_fraction: float, seed: int
) -> str:
    """Writes generated_test.npz into data_dir once (beside `write_embedded_default`'s files) and returns its path.

    `size` images drawn from the embedded default's generator (the same PCA and mixtures, fitted on the same train
    split with `seed`) with a disjoint draw seed (`held_out_sample_seed`): a test split of the generator's
    distribution that is never trained on. Any draw whose uint8 image equals a pool or train image is replaced by a
    further draw of its class, and the count is recorded in generated_test_meta.json. Balanced per class as
    `sample_synthetic`. Raises if the file exists with other settings (nothing is overwritten).
    """
    settings = dict(
        size=size, image_size=image_size, synthetic_size=synthetic_size, test_fraction=test_fraction, seed=seed
    )
    path = os.path.join(data_dir, "generated_test.npz")
    meta_path = os.path.join(data_dir, "generated_test_meta.json")
    if already_written(meta_path, settings, [path]):
        return path
    from jax_advprune.data.npz_format import IMAGE_KEY, open_npz_member

    x_train, y_train, _, _ = digits_split(test_fraction, seed)
    seen = _row_keys(to_uint8_images(x_train, image_size))
    seen |= _row_keys(np.asarray(open_npz_member(os.path.join(data_dir, "synthetic.npz"), IMAGE_KEY)))
    wanted = np.full(DIGITS_CLASSES, size // DIGITS_CLASSES)
    wanted[: size % DIGITS_CLASSES] += 1
    draw = size + size // 10 + DIGITS_CLASSES  # spare draws of every class, to replace any that equal a seen image
    pixels, labels = sample_synthetic(x_train, y_train, draw, seed, sample_seed=held_out_sample_seed(seed))
    images = to_uint8_images(pixels, image_size)
    keep, replaced = [], 0
    for c in range(DIGITS_CLASSES):
        rows = np.flatnonzero(labels == c)
        fresh = [r for r in rows if images[r].tobytes() not in seen]
        replaced += len(rows) - len(fresh)
        if len(fresh) < wanted[c]:
            raise ValueError(f"the generator gave only {len(fresh)} unseen images of class {c}, {wanted[c]} wanted")
        keep.extend(fresh[: wanted[c]])
    keep = np.asarray(keep)
    storage.makedirs(data_dir)
    write_npz(path, images[keep], labels[keep])
    with atomic_output(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(
            {
                "settings": settings,
                "draw_seed": held_out_sample_seed(seed),
                "num_test": int(len(keep)),
                "draws_equal_to_a_pool_or_train_image": int(replaced),
            },
            f,
            indent=2,
        )
    return path
