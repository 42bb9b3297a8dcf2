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
) -> tuple[np.ndarray, np.ndarray]:
    """Fits PCA + per-class Gaussian mixtures to (x_train (N, 64), y_train) and samples.

    Returns (pixels (size, 64) in [0, 1], labels (size,) int64), sorted by class,
    with size // 10 samples per class (the remainder going to the first classes).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    pca = PCA(n_components=pca_components, random_state=seed).fit(x_train)
    codes = pca.transform(x_train)
    per_class = np.full(DIGITS_CLASSES, size // DIGITS_CLASSES)
    per_class[: size % DIGITS_CLASSES] += 1
    rng = np.random.default_rng(seed)
    pixels, labels = [], []
    for c in range(DIGITS_CLASSES):
        mixture = GaussianMixture(
            n_components=mixture_components, covariance_type="full", reg_covar=1e-3, random_state=seed + c
        ).fit(codes[y_train == c])
        with warnings.catch_warnings():  # numerically asymmetric covariances; harmless
            warnings.simplefilter("ignore", RuntimeWarning)
            sampled, _ = mixture.sample(int(per_class[c]))
        sampled = sampled[rng.permutation(len(sampled))]  # sklearn returns them grouped by component
        pixels.append(np.clip(pca.inverse_transform(sampled), 0, 1).astype(np.float32))
        labels.append(np.full(int(per_class[c]), c, np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


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
    if storage.exists(meta_path):
        existing = json.loads(storage.read_text(meta_path))["settings"]
        if existing != settings:
            raise ValueError(
                f"{meta_path} was written with {existing}, but the config asks for {settings}; use a new --workdir"
            )
        if all(storage.exists(p) for p in paths.values()):
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
