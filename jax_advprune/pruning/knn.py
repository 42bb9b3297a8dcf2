"""Exact k-nearest neighbours by chunked matmul + top-k, sharded over the data mesh; score extrapolation.

Neither the distance matrix nor a copy of the queries is held: queries stream
through in chunks of `query_chunk` rows (split over the mesh's devices), and
within a chunk the references are scanned in blocks of `ref_chunk` rows, each
block's k best merged into a running top-k. Memory per device: the references
plus a (query_chunk / devices) x ref_chunk block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel

METRICS = ("euclidean", "cosine")


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def knn_searcher(refs: np.ndarray, *, k: int, metric: str = "euclidean", ref_chunk: int = 16384, mesh: jax.sharding.Mesh):
    """search(queries (M, D)) -> (distances (M, k) float32 ascending, indices (M, k) int32 into refs).

    refs: (R, D) reference embeddings, R >= k. metric 'euclidean' (L2 distance) or
    'cosine' (1 - cosine similarity). M must divide over the mesh.
    """
    if metric not in METRICS:
        raise ValueError(f"kNN metric must be one of {METRICS}, got {metric!r}")
    refs = _prepare(refs, metric)
    r, d = refs.shape
    if r < k:
        raise ValueError(f"kNN needs at least k={k} references, got {r}")
    ref_chunk = min(ref_chunk, r)
    blocks = -(-r // ref_chunk)
    padded = np.zeros((blocks * ref_chunk, d), np.float32)
    padded[:r] = refs
    valid = (np.arange(blocks * ref_chunk) < r).reshape(blocks, ref_chunk)
    ref_blocks = padded.reshape(blocks, ref_chunk, d)
    ref_sq = np.sum(ref_blocks**2, axis=-1)
    offsets = (np.arange(blocks) * ref_chunk).astype(np.int32)

    def shard_search(ref_blocks, ref_sq, valid, offsets, queries):
        q_sq = jnp.sum(queries**2, axis=-1, keepdims=True)

        def block(carry, inputs):
            best_d, best_i = carry
            refs_b, sq_b, valid_b, offset = inputs
            dot = queries @ refs_b.T
            dist = (1.0 - dot) if metric == "cosine" else (q_sq - 2.0 * dot + sq_b[None, :])
            dist = jnp.where(valid_b[None, :], dist, jnp.inf)
            neg_d, idx = jax.lax.top_k(-dist, min(k, ref_chunk))
            merged_d = jnp.concatenate([best_d, -neg_d], axis=1)
            merged_i = jnp.concatenate([best_i, idx + offset], axis=1)
            neg_best, pick = jax.lax.top_k(-merged_d, k)
            return (-neg_best, jnp.take_along_axis(merged_i, pick, axis=1)), None

        init = (jnp.full((queries.shape[0], k), jnp.inf, jnp.float32), jnp.zeros((queries.shape[0], k), jnp.int32))
        (best_d, best_i), _ = jax.lax.scan(block, init, (ref_blocks, ref_sq, valid, offsets))
        if metric == "euclidean":
            best_d = jnp.sqrt(jnp.maximum(best_d, 0.0))
        return best_d, best_i

    search_fn = jax.jit(parallel.shard_over_batch(shard_search, mesh, num_replicated=4))
    placed = jax.device_put((ref_blocks, ref_sq, valid, offsets), parallel.replicated(mesh))

    def search(queries: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """queries (M, D): host rows (prepared here), or rows already prepared and placed over the mesh."""
        if not isinstance(queries, jax.Array):
            queries = parallel.shared_batch(_prepare(queries, metric), mesh)
        return search_fn(*placed, queries)

    search.prepare = lambda queries: _prepare(queries, metric)
    return search


def knn(queries: np.ndarray, refs: np.ndarray, *, k: int, metric: str = "euclidean", query_chunk: int = 4096,
        ref_chunk: int = 16384, mesh: jax.sharding.Mesh, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest references of every query: (distances (Q, k), indices (Q, k)), nearest first.

    Queries are read in fixed-shape chunks of `query_chunk` rows (the last padded),
    so one compiled program serves any Q. `queries` may be a memory-mapped array.
    `progress`: a metrics.Progress over the chunks.
    """
    search = knn_searcher(refs, k=k, metric=metric, ref_chunk=ref_chunk, mesh=mesh)

    def compute(_, x):
        dist, idx = search(x)
        return {"dist": dist, "idx": idx}

    result = parallel.map_rows(
        compute, lambda rows: (search.prepare(queries[rows]),), len(queries), query_chunk, mesh,
        on_chunk=None if progress is None else lambda i, _: progress.update(i + 1),
    )
    if not len(queries):
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return result["dist"], result["idx"]


def extrapolate(ref_scores: np.ndarray, distances: np.ndarray, indices: np.ndarray, weighting: str = "uniform") -> np.ndarray:
    """Scores of queries from their neighbours' scores: (Q,) float32.

    'uniform': the mean (Nieth et al.'s default); 'distance': weights 1 / (distance + 1e-8).
    """
    neighbour_scores = np.asarray(ref_scores, np.float64)[indices]
    if weighting == "uniform":
        return neighbour_scores.mean(axis=1).astype(np.float32)
    if weighting == "distance":
        weights = 1.0 / (np.asarray(distances, np.float64) + 1e-8)
        return (np.sum(weights * neighbour_scores, axis=1) / np.sum(weights, axis=1)).astype(np.float32)
    raise ValueError(f"kNN weighting must be 'uniform' or 'distance', got {weighting!r}")
