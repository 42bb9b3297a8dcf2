"""Writes a test pool of any size in the real DM-Improves-AT npz format, with flat memory.

    python -m jax_advprune.data.make_pool --size 1000000 --out pool.npz
    python -m jax_advprune.data.make_pool --size 5000000 --parts 5 --out pool.npz   # pool_part1.npz ...

Content: per class a fixed random low-frequency pattern plus per-image noise, so
labels are learnable but nothing about the images is meaningful. Labels are
sorted by class within each part, like real generated pools. The output is a
deterministic function of (size, shape, classes, seed, parts); each file appears
only once complete.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jax_advprune import storage
from jax_advprune.data.npz_format import NpzStreamWriter

CHUNK_ROWS = 16_384


def class_templates(num_classes: int, image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(num_classes, H, W, C) uint8 patterns: a random 4x4 grid per class, upsampled."""
    h, w, c = image_shape
    coarse = np.random.default_rng([seed, 0]).integers(0, 256, (num_classes, 4, 4, c), dtype=np.uint8)
    rows, cols = np.arange(h) * 4 // h, np.arange(w) * 4 // w
    return np.ascontiguousarray(coarse[:, rows][:, :, cols])


def part_labels(num_rows: int, num_classes: int, seed: int, part: int) -> np.ndarray:
    """(num_rows,) int64 labels, balanced up to rounding and sorted by class."""
    counts = np.full(num_classes, num_rows // num_classes)
    counts[np.random.default_rng([seed, 1, part]).permutation(num_classes)[: num_rows % num_classes]] += 1
    return np.repeat(np.arange(num_classes, dtype=np.int64), counts)


def write_part(
    path: str,
    num_rows: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    part: int,
    template_seed: int | None = None,
) -> None:
    """Writes one part chunk by chunk (memory: one chunk of CHUNK_ROWS images).

    The class patterns come from `template_seed` (default `seed`), the labels and
    noise from (seed, part): splits sharing a template seed share their classes.
    """
    half_templates = class_templates(num_classes, image_shape, seed if template_seed is None else template_seed) >> 1
    labels = part_labels(num_rows, num_classes, seed, part)
    rng = np.random.default_rng([seed, 2, part])
    row_bytes = int(np.prod(image_shape))
    with NpzStreamWriter(path, num_rows, image_shape) as writer:
        for start in range(0, num_rows, CHUNK_ROWS):
            chunk_labels = labels[start : start + CHUNK_ROWS]
            images = np.frombuffer(bytearray(rng.bytes(len(chunk_labels) * row_bytes)), np.uint8).reshape(
                (-1,) + image_shape
            )
            np.right_shift(images, 1, out=images)  # noise in [0, 127] + template in [0, 127]
            run_starts = np.flatnonzero(np.diff(chunk_labels, prepend=-1))  # labels are sorted: one run per class
            for lo, hi in zip(run_starts, np.append(run_starts[1:], len(chunk_labels))):
                images[lo:hi] += half_templates[chunk_labels[lo]]
            writer.write(images, chunk_labels)


def part_paths(out: str, parts: int) -> list[str]:
    """`out` itself for one part, else <stem>_part1.npz ... <stem>_partK.npz."""
    if parts == 1:
        return [out]
    stem = out[:-4] if out.endswith(".npz") else out
    return [f"{stem}_part{i}.npz" for i in range(1, parts + 1)]


def make_pool(
    out: str,
    size: int,
    *,
    parts: int = 1,
    image_shape=(32, 32, 3),
    num_classes: int = 10,
    seed: int = 0,
    template_seed: int | None = None,
) -> list[str]:
    """Writes `size` images split evenly over `parts` files; returns their paths."""
    if size < 1 or parts < 1 or parts > size:
        raise ValueError(f"need size >= parts >= 1, got size {size} and parts {parts}")
    paths = part_paths(out, parts)
    bounds = np.linspace(0, size, parts + 1).astype(np.int64)
    for i, path in enumerate(paths):
        storage.makedirs(os.path.dirname(storage.absolute(path)))
        write_part(path, int(bounds[i + 1] - bounds[i]), tuple(image_shape), num_classes, seed, i, template_seed)
    return paths


def write_generated_dataset(
    data_dir: str, *, train: int, test: int, synthetic: int, image_shape, num_classes: int, seed: int
) -> dict[str, str]:
    """A whole offline data set in the pool format (train, test, synthetic splits sharing class
    patterns), written into data_dir once; returns the three paths. For smoke runs of the
    paper-sized configs, not for measuring accuracy."""
    paths = {}
    for stream, (name, size) in enumerate((("train", train), ("test", test), ("synthetic", synthetic))):
        paths[name] = os.path.join(data_dir, f"generated_{name}.npz")
        if not storage.exists(paths[name]):
            make_pool(
                paths[name],
                size,
                image_shape=image_shape,
                num_classes=num_classes,
                seed=seed * 3 + stream + 1,
                template_seed=seed,
            )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a test pool in the DM-Improves-AT npz format.")
    parser.add_argument("--size", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="output .npz (with --parts K: <stem>_part1.npz ...)")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.image_shape.split(","))
    if len(shape) != 3:
        parser.error(f"--image-shape must be H,W,C, got {args.image_shape!r}")
    start = time.perf_counter()
    paths = make_pool(
        args.out, args.size, parts=args.parts, image_shape=shape, num_classes=args.num_classes, seed=args.seed
    )
    gib = sum(storage.getsize(p) for p in paths) / 2**30
    print(f"wrote {args.size} images ({gib:.2f} GiB) in {time.perf_counter() - start:.1f}s: {' '.join(paths)}")


if __name__ == "__main__":
    main()
