"""CIFAR-10 / CIFAR-100 from the official python tarballs, converted once to pool npz files.

The user supplies `cifar-10-python.tar.gz` or `cifar-100-python.tar.gz` (from
https://www.cs.toronto.edu/~kriz/cifar.html); each batch inside is a pickle of
`data` (uint8, N x 3072, channel-major) and `labels` (CIFAR-10) or `fine_labels`
(CIFAR-100). `convert_cifar_tarball` writes `<name>_train.npz` and
`<name>_test.npz` in the DM-Improves-AT format (uint8 N x 32 x 32 x 3, int64
labels) next to each other, once; neither TensorFlow nor TFDS is needed.

Command line:

    python -m jax_advprune.data.cifar --tarball cifar-10-python.tar.gz --out data/
"""

from __future__ import annotations

import argparse
import os
import pickle
import tarfile

import numpy as np

from jax_advprune import storage
from jax_advprune.data.npz_format import write_npz

# name -> (train members, test members, label key, classes), members relative to the top folder.
LAYOUTS = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": (["train"], ["test"], b"fine_labels", 100),
}


def _members_by_basename(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    return {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}


def detect_layout(tarball: str) -> str:
    """'cifar10' or 'cifar100' from the members of the tarball; ValueError otherwise."""
    with storage.open_file(tarball, "rb") as f, tarfile.open(fileobj=f) as archive:
        names = set(_members_by_basename(archive))
    for name, (train, test, _, _) in LAYOUTS.items():
        if set(train + test) <= names:
            return name
    raise ValueError(
        f"{tarball}: not a CIFAR python tarball (expected data_batch_1..5 + test_batch, or train + test; "
        f"found {sorted(names)[:10]}); download cifar-10-python.tar.gz or cifar-100-python.tar.gz"
    )


def _read_batches(
    archive: tarfile.TarFile, members: list[str], label_key: bytes, tarball: str
) -> tuple[np.ndarray, np.ndarray]:
    by_name = _members_by_basename(archive)
    images, labels = [], []
    for member in members:
        batch = pickle.load(archive.extractfile(by_name[member]), encoding="bytes")
        if b"data" not in batch or label_key not in batch:
            raise ValueError(
                f"{tarball}: member {member!r} has keys {sorted(batch)}, expected b'data' and {label_key!r}"
            )
        data = np.asarray(batch[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{tarball}: member {member!r} holds data of shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def convert_cifar_tarball(tarball: str, out_dir: str) -> dict[str, str]:
    """Writes <out_dir>/<name>_train.npz and <name>_test.npz from a CIFAR tarball, once.

    Returns {'name', 'num_classes', 'train', 'test'}. Existing outputs are reused
    (each is written to a temporary name and renamed, so an existing file is complete).
    """
    if not storage.exists(tarball):
        raise FileNotFoundError(
            f"CIFAR tarball {tarball} does not exist; download cifar-10-python.tar.gz (or cifar-100-python.tar.gz) "
            "from https://www.cs.toronto.edu/~kriz/cifar.html and pass its path"
        )
    name = detect_layout(tarball)
    train_members, test_members, label_key, num_classes = LAYOUTS[name]
    paths = {"train": os.path.join(out_dir, f"{name}_train.npz"), "test": os.path.join(out_dir, f"{name}_test.npz")}
    storage.makedirs(out_dir)
    with storage.open_file(tarball, "rb") as f, tarfile.open(fileobj=f) as archive:
        for split, members in (("train", train_members), ("test", test_members)):
            if not storage.exists(paths[split]):
                images, labels = _read_batches(archive, members, label_key, tarball)
                write_npz(paths[split], images, labels)
    return {"name": name, "num_classes": num_classes, **paths}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", required=True, help="cifar-10-python.tar.gz or cifar-100-python.tar.gz")
    parser.add_argument("--out", required=True, help="folder for <name>_train.npz and <name>_test.npz")
    args = parser.parse_args(argv)
    result = convert_cifar_tarball(args.tarball, args.out)
    print(f"{result['name']}: {result['train']}, {result['test']}")


if __name__ == "__main__":
    main()
