"""kNN against brute force, and score extrapolation."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from jax_advprune.parallel import make_mesh
from jax_advprune.pruning.knn import extrapolate, faiss_available, knn, knn_engine


def _brute_force(queries, refs, k, metric):
    if metric == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)
        dist = 1.0 - queries @ refs.T
    else:
        dist = np.sqrt(((queries[:, None, :] - refs[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, axis=1), idx


@pytest.mark.parametrize("engine", ["jax", "faiss"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_both_engines_equal_brute_force(metric, engine):
    if engine == "faiss" and not faiss_available():
        pytest.skip("faiss is not installed")  # the [test] extra installs it
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(301, 16)).astype(np.float32)  # not a multiple of the block size
    queries = rng.normal(size=(203, 16)).astype(np.float32)  # not a multiple of the chunk
    dist, idx = knn(queries, refs, k=12, metric=metric, query_chunk=64, ref_chunk=50, mesh=make_mesh(4), engine=engine)
    want_dist, want_idx = _brute_force(queries.astype(np.float64), refs.astype(np.float64), 12, metric)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idx, want_idx)  # continuous data: no ties


def test_extrapolation_recovers_a_smooth_score_and_weights_by_distance():
    rng = np.random.default_rng(1)
    refs = rng.uniform(-1, 1, size=(2000, 2)).astype(np.float32)
    queries = rng.uniform(-1, 1, size=(300, 2)).astype(np.float32)
    score = lambda z: z[:, 0] ** 2 + np.sin(3 * z[:, 1])  # noqa: E731
    dist, idx = knn(queries, refs, k=12, query_chunk=100, ref_chunk=512, mesh=make_mesh(1))
    predicted = extrapolate(score(refs), dist, idx)
    assert spearmanr(predicted, score(queries)).statistic > 0.95
    np.testing.assert_allclose(extrapolate(np.array([1.0, 3.0]), np.array([[0.0, 1.0]]), np.array([[0, 1]]), "uniform"), [2.0])
    weighted = extrapolate(np.array([1.0, 3.0]), np.array([[1.0, 3.0]]), np.array([[0, 1]]), "distance")
    assert weighted[0] == pytest.approx((1.0 + 3.0 / 3.0) / (1.0 + 1.0 / 3.0), rel=1e-5)


def test_auto_picks_faiss_on_a_cpu_when_installed_and_explicit_engines_are_honoured():
    mesh = make_mesh(2)
    assert knn_engine(mesh, "auto") == ("faiss" if faiss_available() else "jax")
    assert knn_engine(mesh, "jax") == "jax"
    with pytest.raises(ValueError, match="engine must be one of"):
        knn_engine(mesh, "annoy")
