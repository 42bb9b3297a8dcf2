"""Exact k-nearest neighbours and score extrapolation, with two engines behind one function.

`knn(queries, refs, ...)` streams the queries (a memory-mapped array is fine) in
chunks of `query_chunk` rows through one of two exact engines:
  - 'faiss': faiss's exact flat index (IndexFlatL2, or inner product on normalised
    vectors for cosine), where the faiss package is installed and the mesh is on a
    CPU of one process: faster than the JAX engine there (benchmarks/scoring.py);
  - 'jax': a chunked matmul + top-k sharded over the data mesh: within a chunk
    the references are scanned in blocks of `ref_chunk` rows, each block's k best
    merged into a running top-k. The engine for accelerators, multi-host meshes
    and machines without faiss.
Neither engine holds the (Q, R) distance matrix or a copy of the queries: memory
is the references, one chunk of queries and their neighbours, and what is kept of
the results: `knn` fills (Q, k) distances and indices (8k bytes per query; pass
`out=` memory-mapped files to keep them on disk), `extrapolate_knn` reduces every
chunk to its queries' scores at once (4 bytes per query). `knn_engine` says which
engine a call gets (the score phase logs it and records it in scores/meta.json).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel

METRICS = ("euclidean", "cosine")
ENGINES = ("auto", "faiss", "jax")


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether the faiss package can be imported here."""
    return _faiss() is not None


def knn_engine(mesh: jax.sharding.Mesh, engine: str = "auto") -> str:
    """'faiss' or 'jax': the engine `knn` uses for `engine` ('auto': faiss when installed, on a CPU mesh of one process)."""
    if engine not in ENGINES:
        raise ValueError(f"kNN engine must be one of {ENGINES}, got {engine!r}")
    if engine == "faiss" and _faiss() is None:
        raise ImportError("kNN engine 'faiss' needs the faiss package: pip install faiss-cpu (or a GPU build)")
    if engine != "auto":
        return engine
    cpu_mesh = mesh.devices.flat[0].platform == "cpu"
    return "faiss" if _faiss() is not None and cpu_mesh and jax.process_count() == 1 else "jax"


def faiss_searcher(refs: np.ndarray, *, k: int, metric: str = "euclidean", threads: int | None = None):
    """search(queries (M, D)) -> (distances (M, k) float32 ascending, indices (M, k) int32) with faiss's exact flat index.

    Same distances as `knn_searcher`: L2 distance, or 1 - cosine similarity.
    threads: OpenMP threads for faiss (default: every core this process may run on).
    """
    faiss = _faiss()
    refs = _prepare(refs, metric)
    if len(refs) < k:
        raise ValueError(f"kNN needs at least k={k} references, got {len(refs)}")
    faiss.omp_set_num_threads(threads or _usable_cores())
    index = faiss.IndexFlatIP(refs.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(refs.shape[1])
    index.add(np.ascontiguousarray(refs))

    def search(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = index.search(np.ascontiguousarray(_prepare(queries, metric)), k)
        dist = 1.0 - scores if metric == "cosine" else np.sqrt(np.maximum(scores, 0.0))
        return dist.astype(np.float32), idx.astype(np.int32)

    return search


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


NORMALIZATIONS = ("none", "l2")


def normalize_rows(x: np.ndarray, normalize: str, chunk: int = 65536) -> np.ndarray:
    """x (N, D) with every row scaled to unit L2 length ('l2'; a zero row stays zero), in place chunk by chunk
    when x is a writable float32 array (a memory-mapped embedding), else as a new float32 array; 'none': x."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"embedding normalization must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "none":
        return x
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.writeable):
        x = np.array(x, np.float32)
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk]
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return x


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def knn_searcher(
    refs: np.ndarray, *, k: int, metric: str = "euclidean", ref_chunk: int = 16384, mesh: jax.sharding.Mesh
):
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
    search_fn = search_program(k=k, ref_chunk=ref_chunk, metric=metric, mesh=mesh)
    placed = jax.device_put((ref_blocks, ref_sq, valid, offsets), parallel.replicated(mesh))

    def search(queries: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """queries (M, D): host rows (prepared here), or rows already prepared and placed over the mesh."""
        if not isinstance(queries, jax.Array):
            queries = parallel.shared_batch(_prepare(queries, metric), mesh)
        return search_fn(*placed, queries)

    search.prepare = lambda queries: _prepare(queries, metric)
    return search


def search_program(*, k: int, ref_chunk: int, metric: str, mesh: jax.sharding.Mesh):
    """The JAX engine's jitted (ref_blocks (NB, C, D), ref_sq (NB, C), valid (NB, C) bool, offsets (NB,) int32,
    queries (M, D)) -> (distances (M, k), indices (M, k)): a scan over the NB blocks of C references with a running
    top-k, the queries split over the mesh."""

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

    return jax.jit(parallel.shard_over_batch(shard_search, mesh, num_replicated=4))


def knn(
    queries: np.ndarray,
    refs: np.ndarray,
    *,
    k: int,
    metric: str = "euclidean",
    query_chunk: int = 4096,
    ref_chunk: int = 16384,
    mesh: jax.sharding.Mesh,
    progress=None,
    engine: str = "auto",
    out: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest references of every query: (distances (Q, k) float32, indices (Q, k) int32), nearest first, exact.

    Queries are read in chunks of `query_chunk` rows (the JAX engine pads the last,
    so one compiled program serves any Q). `queries` may be a memory-mapped array.
    engine: 'auto' (see `knn_engine`), 'faiss' or 'jax'. `progress`: a metrics.Progress
    over the chunks. out: {'dist', 'idx'} (Q, k) arrays to fill, e.g. memory-mapped
    files, so that not even the results are held in memory.
    """
    result = _search_chunks(
        queries,
        refs,
        lambda dist, idx: {"dist": dist, "idx": idx},
        k=k,
        metric=metric,
        query_chunk=query_chunk,
        ref_chunk=ref_chunk,
        mesh=mesh,
        progress=progress,
        engine=engine,
        out=out,
    )
    if not len(queries):
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return result["dist"], result["idx"]


def extrapolate_knn(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_scores: np.ndarray,
    *,
    k: int,
    metric: str = "euclidean",
    weighting: str = "uniform",
    query_chunk: int = 4096,
    ref_chunk: int = 16384,
    mesh: jax.sharding.Mesh,
    progress=None,
    engine: str = "auto",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Every query's score from its k nearest references' scores, chunk by chunk: (Q,) float32.

    `knn` then `extrapolate`, without holding the (Q, k) neighbours: memory is the
    references, one chunk of queries and their neighbours, and the (Q,) scores
    (`out`, e.g. a memory-mapped file, to hold not even those). queries (Q, D),
    refs (R, D), ref_scores (R,).
    """
    if len(ref_scores) != len(refs):
        raise ValueError(f"{len(ref_scores)} reference scores for {len(refs)} references")
    result = _search_chunks(
        queries,
        refs,
        lambda dist, idx: {"score": extrapolate(ref_scores, dist, idx, weighting)},
        k=k,
        metric=metric,
        query_chunk=query_chunk,
        ref_chunk=ref_chunk,
        mesh=mesh,
        progress=progress,
        engine=engine,
        out=None if out is None else {"score": out},
    )
    return result["score"] if len(queries) else np.zeros(0, np.float32)


def _search_chunks(
    queries,
    refs,
    reduce,
    *,
    k: int,
    metric: str,
    query_chunk: int,
    ref_chunk: int,
    mesh,
    progress,
    engine: str,
    out: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Searches the queries chunk by chunk; reduce(dist (M, k), idx (M, k)) -> {name: (M, ...) host array} of
    every chunk is stored into {name: (Q, ...)} (`out`'s arrays where given)."""
    on_chunk = None if progress is None else (lambda i, _: progress.update(i + 1))
    if knn_engine(mesh, engine) == "faiss":
        search = faiss_searcher(refs, k=k, metric=metric)
        out = dict(out or {})
        for i, start in enumerate(range(0, len(queries), query_chunk)):
            stop = min(start + query_chunk, len(queries))
            for name, value in reduce(*search(np.asarray(queries[start:stop]))).items():
                if name not in out:
                    out[name] = np.zeros((len(queries),) + value.shape[1:], value.dtype)
                out[name][start:stop] = value
            if on_chunk is not None:
                on_chunk(i, None)
        return out
    search = knn_searcher(refs, k=k, metric=metric, ref_chunk=ref_chunk, mesh=mesh)
    return parallel.map_rows(
        lambda _, x: reduce(*(parallel.to_host(a) for a in search(x))),
        lambda rows: (search.prepare(queries[rows]),),
        len(queries),
        query_chunk,
        mesh,
        out=out,
        on_chunk=on_chunk,
    )


def extrapolate(
    ref_scores: np.ndarray, distances: np.ndarray, indices: np.ndarray, weighting: str = "uniform"
) -> np.ndarray:
    """Scores of queries from their neighbours' scores: (Q,) float32 (`extrapolate_knn` calls it chunk by chunk).

    'uniform': the mean (Nieth et al.'s default); 'distance': weights 1 / (distance + 1e-8).
    """
    neighbour_scores = np.asarray(ref_scores, np.float64)[indices]
    if weighting == "uniform":
        return neighbour_scores.mean(axis=1).astype(np.float32)
    if weighting == "distance":
        weights = 1.0 / (np.asarray(distances, np.float64) + 1e-8)
        return (np.sum(weights * neighbour_scores, axis=1) / np.sum(weights, axis=1)).astype(np.float32)
    raise ValueError(f"kNN weighting must be 'uniform' or 'distance', got {weighting!r}")
