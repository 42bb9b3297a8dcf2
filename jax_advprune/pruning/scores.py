"""Per-sample scores over a pool, indexed by global pool position."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks import deepfool
from jax_advprune.batching import padded_batches
from jax_advprune.data.sources import Pool
from jax_advprune.metrics import Progress


def margin_scores(
    apply_fn: Callable[[dict, jax.Array], jax.Array],
    variables: dict,
    pool: Pool,
    *,
    chunk_size: int,
    slots: int,
    norm: str,
    max_iter: int,
    overshoot: float,
    candidates: int | None,
    mesh: jax.sharding.Mesh,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """DeepFool margins of every pool sample under an inference-mode model.

    Reads the pool in fixed-shape chunks of `chunk_size` samples (the last one
    padded); inside a chunk DeepFool runs a work queue of `slots` samples, so a
    chunk costs its samples' total iterations, not its slowest sample's. Each chunk
    is split over the mesh's devices, each running its own queue of
    slots / devices samples (both sizes must divide evenly).
    Returns `margin` (N,) float32 (signed, in units of `norm` on [0, 1] pixels),
    `converged` (N,) bool and `n_iter` (N,) int32.
    """

    parallel.check_divisible(chunk_size, mesh, "scoring chunk size")
    parallel.check_divisible(slots, mesh, "scoring slots")

    def shard_scores(variables, x_uint8, y):
        x = x_uint8.astype(jnp.float32) / 255.0
        result = deepfool(
            lambda z: apply_fn(variables, z), x, y,
            norm=norm, max_iter=max_iter, overshoot=overshoot, candidates=candidates, slots=slots // mesh.size,
        )
        return result.margin, result.converged, result.n_iter

    score_batch = jax.jit(parallel.shard_over_batch(shard_scores, mesh, num_replicated=1))

    n = len(pool)
    out = {"margin": np.zeros(n, np.float32), "converged": np.zeros(n, bool), "n_iter": np.zeros(n, np.int32)}
    for chunk, (idx, valid) in enumerate(padded_batches(n, chunk_size), start=1):
        images, labels = pool.read(idx)
        margin, converged, n_iter = score_batch(variables, images, labels.astype(np.int32))
        rows = idx[valid]
        out["margin"][rows] = np.asarray(margin)[valid]
        out["converged"][rows] = np.asarray(converged)[valid]
        out["n_iter"][rows] = np.asarray(n_iter)[valid]
        if progress is not None:
            progress.update(chunk, mean_iterations=float(np.mean(np.asarray(n_iter)[valid])))
    return out
