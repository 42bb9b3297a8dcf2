"""DeepFool margins over a pool (PUMA's score): the host-driven work queue and the chunked map over pool rows.

A margin here is a sample's distance to the decision boundary (not the
Carlini-Wagner logit margin of `attacks.objectives.cw_margin`)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks.common import to_unit_interval
from jax_advprune.attacks.deepfool import DeepFoolResult, num_candidates, queue_result, queue_start, queue_step
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
        # Placed once (a no-op when already placed): the host loop below must not re-send the batch or the weights every step.
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
    mesh: jax.sharding.Mesh,
    indices: np.ndarray | None = None,
    resume_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """DeepFool margins of pool rows `indices` (default: all), with `run` from `deepfool_runner`.

    Reads the pool in fixed-shape chunks of `chunk_size` samples (the last one
    padded, its padding discarded); within a chunk the runner's work queue makes
    the cost follow the samples' total iterations, not the slowest sample's.
    With `resume_dir`, each finished chunk is saved there and chunks already there
    are loaded instead of recomputed, so a killed run resumes where it stopped.
    Returns `margin` (M,) float32 (signed, in units of the runner's norm on [0, 1]
    pixels), `converged` (M,) bool and `n_iter` (M,) int32, in the order of `indices`.
    """
    indices = np.arange(len(pool)) if indices is None else np.asarray(indices)
    variables = jax.device_put(variables, parallel.replicated(mesh))  # once, not per chunk

    def compute(_, images, labels):
        result = run(variables, images, labels)
        return {"margin": result.margin, "converged": result.converged, "n_iter": result.n_iter}

    def read(rows):
        images, labels = pool.read(indices[rows])
        return images, labels.astype(np.int32)

    report = None if progress is None else lambda i, done: progress.update(i + 1, mean_iterations=float(done["n_iter"].mean()))
    out = parallel.map_rows(compute, read, len(indices), chunk_size, mesh, resume_dir=resume_dir, on_chunk=report)
    return {name: out.get(name, np.zeros(0, dtype)) for name, dtype in (("margin", np.float32), ("converged", bool), ("n_iter", np.int32))}
