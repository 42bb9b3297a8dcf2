"""Per-sample scores over a pool, indexed by global pool position."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks.common import to_unit_interval
from jax_advprune.attacks.deepfool import DeepFoolResult, num_candidates, queue_result, queue_start, queue_step
from jax_advprune.batching import padded_batches
from jax_advprune.data.sources import Pool
from jax_advprune.metrics import Progress


def deepfool_runner(
    apply_fn: Callable[[dict, jax.Array], jax.Array],
    *,
    slots: int,
    norm: str,
    max_iter: int,
    overshoot: float,
    candidates: int | None,
    mesh: jax.sharding.Mesh,
    steps_per_check: int = 2,
) -> Callable[[dict, jax.Array, jax.Array], DeepFoolResult]:
    """run(variables, x (B, H, W, C), y (B,)) -> DeepFoolResult: the DeepFool work queue, host-driven.

    x is uint8 in [0, 255] or float in [0, 1]. B and `slots` must divide evenly over the
    mesh; each device runs its own queue of slots / devices samples over its B / devices
    samples. The host checks after every `steps_per_check` jitted steps whether any slot
    is still busy: XLA:CPU runs straight-line code about twice as fast as a loop body.
    """
    parallel.check_divisible(slots, mesh, "DeepFool slots")
    slots_per_device = slots // mesh.size

    def start_shard(variables, x):
        k = num_candidates(lambda z: apply_fn(variables, z), x, slots_per_device, candidates)
        return queue_start(to_unit_interval(x), slots=slots_per_device, num_candidates=k)

    def advance_shard(variables, x, queue):
        x = to_unit_interval(x)
        for _ in range(steps_per_check):
            queue = queue_step(lambda z: apply_fn(variables, z), x, queue, norm=norm, max_iter=max_iter, overshoot=overshoot)
        return queue

    start = jax.jit(parallel.shard_over_batch(start_shard, mesh, 1))
    advance = jax.jit(parallel.shard_over_batch(advance_shard, mesh, 1), donate_argnums=2)
    finish = jax.jit(parallel.shard_over_batch(queue_result, mesh, 0))

    def run(variables, x, y):
        parallel.check_divisible(x.shape[0], mesh, "DeepFool batch")
        # Placed once: the host loop below must not re-send the batch or the weights every step.
        variables = jax.device_put(variables, parallel.replicated(mesh))
        x, y = parallel.shared_batch((x, y), mesh)
        queue = start(variables, x)
        while np.any(parallel.to_host(queue.slot["live"])):
            queue = advance(variables, x, queue)
        return finish(queue, y)

    return run


def margin_scores(
    run: Callable[[dict, jax.Array, jax.Array], DeepFoolResult],
    variables: dict,
    pool: Pool,
    *,
    chunk_size: int,
    indices: np.ndarray | None = None,
    resume_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """DeepFool margins of pool rows `indices` (default: all), with `run` from `deepfool_runner`.

    Reads the pool in fixed-shape chunks of `chunk_size` samples (the last one
    padded, its padding discarded); within a chunk the runner's work queue makes
    the cost follow the samples' total iterations, not the slowest sample's.
    With `resume_dir`, each finished chunk is saved there (chunk_<i>.npz, written
    atomically) and chunks already there are loaded instead of recomputed, so a
    killed run resumes where it stopped.
    Returns `margin` (M,) float32 (signed, in units of the runner's norm on [0, 1]
    pixels), `converged` (M,) bool and `n_iter` (M,) int32, in the order of `indices`.
    """
    indices = np.arange(len(pool)) if indices is None else np.asarray(indices)
    m = len(indices)
    out = {"margin": np.zeros(m, np.float32), "converged": np.zeros(m, bool), "n_iter": np.zeros(m, np.int32)}
    finished: set[str] = set()
    if resume_dir:
        os.makedirs(resume_dir, exist_ok=True)
        # Decided once, so every process of a multi-host run skips the same chunks.
        finished = {name for name in os.listdir(resume_dir) if name.startswith("chunk_") and ".tmp" not in name}
    for chunk, (rows, valid) in enumerate(padded_batches(m, chunk_size), start=1):
        path = os.path.join(resume_dir, f"chunk_{chunk:06d}.npz") if resume_dir else None
        if path and os.path.basename(path) in finished:
            with np.load(path) as saved:
                done = {name: saved[name] for name in out}
        else:
            images, labels = pool.read(indices[rows])
            result = run(variables, images, labels.astype(np.int32))
            done = {name: parallel.to_host(getattr(result, name))[valid] for name in out}
            if path and jax.process_index() == 0:
                np.savez(path + ".tmp.npz", **done)
                os.replace(path + ".tmp.npz", path)
        for name in out:
            out[name][rows[valid]] = done[name]
        if progress is not None:
            progress.update(chunk, mean_iterations=float(done["n_iter"].mean()))
    return out
