"""The resume log of a long loop: numbered records saved as they finish, so that a killed or preempted run
resumes after the last one saved. Used by the chunked maps over a pool (`parallel.map_rows`: chunk_000000.npz, ...),
the scoring run's history (epoch_00001.npz, ...) and the AutoAttack evaluator's passes (pass_000.npz, ...).

Records are .npz files `<directory>/<prefix><index, zero-padded to width>.npz`, written atomically by process 0
(a record is there whole or not at all). Which records exist is listed once, when the log is opened, after every
process has got there, so every process of a multi-host run skips the same ones.
"""

from __future__ import annotations

import os

import numpy as np

from jax_advprune import preemption, storage


class ResumeLog:
    """Records `<prefix><i>.npz` in `directory` (made when missing).

    names: the file names of the records saved when the log was opened (every process sees the same set).
    save(i, **arrays) (process 0, atomic), load(i) -> {name: array}, has(i), indices() (the saved ones, sorted),
    stop_if_preempted(done) after a save: on a SIGTERM, raises `preemption.Preempted` naming what was saved.
    """

    def __init__(self, directory: str, prefix: str, width: int):
        self.directory, self.prefix, self.width = directory, prefix, width
        storage.makedirs(directory)
        self.names = self._listing()

    def _listing(self) -> set[str]:
        """The complete records in the directory once every process has got here (the '.tmp' files of atomic writes
        left out)."""
        from jax_advprune.parallel import sync  # parallel imports this module

        sync(f"listing {self.directory}")
        return {
            name
            for name in storage.listdir(self.directory)
            if name.startswith(self.prefix) and name.endswith(".npz") and ".tmp" not in name
        }

    def name(self, index: int) -> str:
        return f"{self.prefix}{index:0{self.width}d}.npz"

    def path(self, index: int) -> str:
        return os.path.join(self.directory, self.name(index))

    def has(self, index: int) -> bool:
        """Whether record `index` was saved when the log was opened."""
        return self.name(index) in self.names

    def save(self, index: int, **arrays: np.ndarray) -> None:
        storage.save_npz(self.path(index), **arrays)

    def load(self, index: int) -> dict[str, np.ndarray]:
        return storage.load_npz(self.path(index))

    def indices(self, relist: bool = False) -> list[int]:
        """The saved records' indices, sorted: those listed when the log was opened, or with `relist` those in the
        directory now, this run's included (every process must call it at the same point)."""
        names = self._listing() if relist else self.names
        return sorted(int(name[len(self.prefix) : -len(".npz")]) for name in names)

    def consecutive(self) -> int:
        """How many records 0, 1, 2, ... were saved without a gap when the log was opened."""
        count = 0
        while self.has(count):
            count += 1
        return count

    def stop_if_preempted(self, saved: str) -> None:
        """After a save: on a preemption notice, stops the run (`saved` says what is in the log)."""
        if preemption.stop_requested():
            raise preemption.Preempted(
                f"preempted (SIGTERM): {saved} saved in {self.directory}; rerun the same command to resume from there"
            )
