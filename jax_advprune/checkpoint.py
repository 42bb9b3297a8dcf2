"""Orbax checkpoints of the train state together with the grain data-iterator state."""

from __future__ import annotations

import hashlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jax_advprune import storage


class _Manager(ocp.CheckpointManager):
    """orbax's manager without its own preemption check: the run asks JAX's preemption sync manager itself
    (jax_advprune.preemption, with one call counter for the whole run) and saves then; orbax asking it too,
    with training steps as counters, would move the agreed sync point."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """Keeps checkpoints of (train state, data iterator) in `directory`.

    Without `best_metric`: the last `max_to_keep` saves. With it: the `max_to_keep`
    saves with the highest `metrics[best_metric]` (recorded with each save, so the
    choice survives a restart). Saves are asynchronous; call `wait()` before
    reading them or exiting.
    """

    def __init__(self, directory: str, max_to_keep: int = 2, best_metric: str | None = None):
        self.directory = storage.absolute(directory)  # orbax and tensorstore speak gs:// themselves
        # In a multi-host run the last-N and the best-validation managers save at the same step, both
        # asynchronously; orbax synchronises the processes with named barriers, which must differ between
        # managers that save concurrently ("Barrier ... is already ongoing" otherwise).
        multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix(self.directory))
        best = (
            {}
            if best_metric is None
            else dict(
                best_fn=lambda metrics: metrics[best_metric], best_mode="max", keep_checkpoints_without_metrics=False
            )
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, multiprocessing_options=multiprocessing, **best
        )
        self.manager = _Manager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_iterator=None, metrics: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> Any:
        """Restores the state at `step` (default: latest) into `abstract_state`'s structure.

        When `data_iterator` is given its position is restored in place too.
        """
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def barrier_prefix(directory: str) -> str:
    """A name for orbax's multi-host barriers, the same on every process for one checkpoint directory and
    different between directories: 'ckpt_' + 12 hex digits of the path's SHA-1."""
    return "ckpt_" + hashlib.sha1(directory.encode()).hexdigest()[:12]


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct tree of `tree`, for restoring without allocating twice."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def best_checkpoint_dir(ckpt_dir: str) -> str:
    """Where a training run's best-validation checkpoint lives, next to its checkpoint directory."""
    return ckpt_dir + "_best"


def best_checkpointer(ckpt_dir: str) -> Checkpointer:
    """The best-validation checkpoint of a training run: the save with the highest validation PGD accuracy."""
    return Checkpointer(best_checkpoint_dir(ckpt_dir), max_to_keep=1, best_metric="pgd_accuracy")
