"""Where a run's data come from: config.data -> the pool, the test split and the trainable mask.

`load_data` opens (and for the embedded and generated sources writes once) the
pool `[original training split ; synthetic parts]` and the test split;
`data_shape` tells their sizes without writing anything, for the checks made
before a run spends compute; `input_files` lists the user's files, whose
fingerprints guard a work directory against a replaced pool.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jax_advprune import parallel, storage
from jax_advprune.data.cifar import LAYOUTS, convert_cifar_tarball, detect_layout
from jax_advprune.data.generate import digits_split, write_embedded_default, write_held_out_generated
from jax_advprune.data.make_pool import write_generated_dataset
from jax_advprune.data.sources import NpzPart, Pool, open_pool

log = logging.getLogger("jax_advprune")

DATA_SOURCES = ("digits", "npz", "cifar_tarball", "tfds", "generated")
CIFAR_SIZES = (50_000, 10_000, (32, 32, 3))  # train, test, image shape of both CIFAR tarballs


@dataclasses.dataclass
class Data:
    """The pool (read on demand), the test split (in memory, uint8 NHWC) and which pool rows may be trained on.

    trainable: (N,) bool, every pool row except the validation slice, which is
    never trained on, scored or selected. files: every file the data were read
    from (pool parts, test split, tarball), for fingerprints.
    """

    pool: Pool
    test_images: np.ndarray
    test_labels: np.ndarray
    trainable: np.ndarray
    files: list[str]
    # eval.generated_test_size > 0 (digits only): a held-out split drawn from the pool's generator, never trained on
    held_out_images: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DataShape:
    """Sizes of a run's data, known before it is written: rows of the original split, of the synthetic
    parts (in order) and of the test split, and the image shape (H, W, C)."""

    num_original: int
    num_synthetic: tuple[int, ...]
    num_test: int
    image_shape: tuple[int, ...]


def validation_indices(num_original: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices (size,) of the held-out slice of the original training split, fixed by `seed`."""
    if not 0 <= size < num_original:
        raise ValueError(f"train.validation_size ({size}) must be in [0, {num_original}), the original split's size")
    return np.sort(np.random.default_rng([seed, 7]).choice(num_original, size, replace=False))


def trainable_mask(pool_size: int, num_original: int, validation_size: int, seed: int) -> np.ndarray:
    """(N,) bool: every pool row except the validation slice."""
    trainable = np.ones(pool_size, bool)
    trainable[validation_indices(num_original, validation_size, seed)] = False
    return trainable


def input_files(config) -> list[str]:
    """The files the user supplies: config.data's (original, test, synthetic parts, tarball), in order, then the
    checkpoint files of scoring/train/eval.init_from and scoring.extrapolation.embedding_from."""
    cfg = config.data
    files = {"npz": [cfg.original, cfg.test], "cifar_tarball": [cfg.tarball]}.get(cfg.name, [])
    weights = [config[key].init_from for key in ("scoring", "train", "eval") if config[key].get("init_from")]
    weights += (
        [config.scoring.extrapolation.embedding_from] if config.scoring.extrapolation.get("embedding_from") else []
    )
    return [f for f in files if f] + list(cfg.synthetic) + [w for w in weights if storage.isfile(w)]


def data_shape(config) -> DataShape:
    """The sizes of config.data's splits, read from headers (user files) or from the settings (embedded and
    generated data, not written yet). Raises the readers' errors (PoolFormatError, ...) on bad files."""
    cfg = config.data
    synthetic = tuple(len(NpzPart(p, cfg.num_classes)) for p in cfg.synthetic)
    if cfg.name == "digits":
        _, y_train, _, y_test = digits_split(cfg.test_fraction, cfg.seed)
        return DataShape(
            len(y_train), (cfg.synthetic_size,) + synthetic, len(y_test), (cfg.image_size, cfg.image_size, 1)
        )
    if cfg.name == "generated":
        train, test, generated = cfg.generated_sizes
        return DataShape(train, (generated,) + synthetic, test, tuple(cfg.generated_image_shape))
    if cfg.name == "cifar_tarball":
        layout = detect_layout(cfg.tarball)
        if LAYOUTS[layout][3] != cfg.num_classes:
            raise ValueError(
                f"{cfg.tarball} is {layout} ({LAYOUTS[layout][3]} classes) but data.num_classes is {cfg.num_classes}"
            )
        return DataShape(CIFAR_SIZES[0], synthetic, CIFAR_SIZES[1], CIFAR_SIZES[2])
    original, test = _original_and_test(config, {"train": cfg.original, "test": cfg.test})
    return DataShape(len(original), synthetic, len(test), tuple(original.image_shape))


def _original_and_test(config, paths: dict):
    cfg = config.data
    if cfg.name == "tfds":
        from jax_advprune.data.tfds_source import TfdsPart

        return (
            TfdsPart(cfg.tfds_name, "train", cfg.tfds_data_dir, cfg.num_classes),
            TfdsPart(cfg.tfds_name, "test", cfg.tfds_data_dir, cfg.num_classes),
        )
    return NpzPart(paths["train"], cfg.num_classes), NpzPart(paths["test"], cfg.num_classes)


def _prepared_once(what: str, prepare):
    """Runs `prepare` (which writes files once and returns their paths) on process 0, waits for it,
    then on every process, where it finds the files complete and only returns the paths."""
    if storage.is_writer():
        prepare()
    parallel.sync(f"{what} written")
    return prepare()


def load_data(config, data_dir: str) -> Data:
    """Opens the pool `[original training split ; config.data.synthetic parts]` and the test split.

    config.data.name picks the original and test splits: 'digits' writes the
    embedded default into `data_dir` once (a run's `<workdir>/data`; its generated
    pool comes first among the synthetic parts); 'npz' reads user files in the
    DM-Improves-AT format; 'cifar_tarball' converts the official CIFAR-10/100 python
    tarball into npz files once (in data.cache_dir, default `data_dir`); 'tfds'
    reads a prepared TFDS data set through tfds.data_source; 'generated' writes a
    class-pattern data set of data.generated_sizes (train, test, synthetic) into
    `data_dir` once (smoke runs of the paper configs, offline).
    """
    cfg = config.data
    cache_dir = cfg.get(
        "cache_dir", ""
    )  # operational, so not in recorded settings (export_selection reopens from those)
    synthetic = list(cfg.synthetic)
    paths = {"train": cfg.original, "test": cfg.test}
    if cfg.name == "digits":
        paths = _prepared_once(
            "embedded default",
            lambda: write_embedded_default(
                data_dir,
                image_size=cfg.image_size,
                synthetic_size=cfg.synthetic_size,
                test_fraction=cfg.test_fraction,
                seed=cfg.seed,
            ),
        )
        synthetic = [paths["synthetic"]] + synthetic
    elif cfg.name == "cifar_tarball":
        paths = _prepared_once("CIFAR conversion", lambda: convert_cifar_tarball(cfg.tarball, cache_dir or data_dir))
    elif cfg.name == "generated":
        paths = _prepared_once(
            "generated data",
            lambda: write_generated_dataset(
                data_dir,
                train=cfg.generated_sizes[0],
                test=cfg.generated_sizes[1],
                synthetic=cfg.generated_sizes[2],
                image_shape=tuple(cfg.generated_image_shape),
                num_classes=cfg.num_classes,
                seed=cfg.seed,
            ),
        )
        synthetic = [paths["synthetic"]] + synthetic
    given = [p for p in (paths.get("train"), paths.get("test"), *synthetic) if p]  # fingerprinted under these names
    if cache_dir and cfg.name != "tfds":  # remote files read from a local copy, made once per host
        paths = {
            **paths,
            **{k: storage.local_copy(paths[k], cache_dir, log) for k in ("train", "test") if paths.get(k)},
        }
        synthetic = [storage.local_copy(p, cache_dir, log) for p in synthetic]
    original, test = _original_and_test(config, paths)
    pool = open_pool(original, synthetic, cfg.num_classes)
    test_images, test_labels = test.read(np.arange(len(test)))
    if test_images.shape[1:] != pool.image_shape:
        raise ValueError(
            f"test split {test.name} has images of shape {test_images.shape[1:]}, the pool {pool.image_shape}"
        )
    log.info(
        "pool: %d original + %d synthetic images of shape %s; test: %d",
        pool.num_original,
        len(pool) - pool.num_original,
        pool.image_shape,
        len(test_labels),
    )
    trainable = trainable_mask(len(pool), pool.num_original, config.train.validation_size, config.seed)
    files = (given if cfg.name != "tfds" else []) + ([cfg.tarball] if cfg.name == "cifar_tarball" else [])
    held_out_images = held_out_labels = None
    # (a config reopened from recorded data settings, as export_selection does, has no eval section)
    if cfg.name == "digits" and "eval" in config and config.eval.get("generated_test_size", 0):
        held_out_path = _prepared_once(
            "held-out generated split",
            lambda: write_held_out_generated(
                data_dir,
                size=config.eval.generated_test_size,
                image_size=cfg.image_size,
                synthetic_size=cfg.synthetic_size,
                test_fraction=cfg.test_fraction,
                seed=cfg.seed,
            ),
        )
        held_out = NpzPart(held_out_path, cfg.num_classes)
        held_out_images, held_out_labels = held_out.read(np.arange(len(held_out)))
        files.append(held_out_path)
        log.info("held-out generated split: %d images of the pool's generator (never trained on)", len(held_out))
    return Data(pool, test_images, test_labels, trainable, files, held_out_images, held_out_labels)
