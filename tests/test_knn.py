"""kNN against brute force, and score extrapolation."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from jax_advprune.parallel import make_mesh
from jax_advprune.pruning.knn import extrapolate, extrapolate_knn, faiss_available, knn, knn_engine


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
    np.testing.assert_allclose(
        extrapolate(np.array([1.0, 3.0]), np.array([[0.0, 1.0]]), np.array([[0, 1]]), "uniform"), [2.0]
    )
    weighted = extrapolate(np.array([1.0, 3.0]), np.array([[1.0, 3.0]]), np.array([[0, 1]]), "distance")
    assert weighted[0] == pytest.approx((1.0 + 3.0 / 3.0) / (1.0 + 1.0 / 3.0), rel=1e-5)


def test_auto_picks_faiss_on_a_cpu_when_installed_and_explicit_engines_are_honoured():
    mesh = make_mesh(2)
    assert knn_engine(mesh, "auto") == ("faiss" if faiss_available() else "jax")
    assert knn_engine(mesh, "jax") == "jax"
    with pytest.raises(ValueError, match="engine must be one of"):
        knn_engine(mesh, "annoy")


@pytest.mark.parametrize("engine", ["jax", "faiss"])
def test_streamed_extrapolation_equals_knn_then_extrapolate_and_holds_one_chunk(engine, tmp_path):
    """extrapolate_knn on memory-mapped queries into a memory-mapped output: the scores of knn + extrapolate,
    while the host memory NumPy allocates (tracemalloc) stays at a chunk's, far below the (Q, k) neighbours."""
    import tracemalloc

    if engine == "faiss" and not faiss_available():
        pytest.skip("faiss is not installed")
    rng = np.random.default_rng(2)
    num_queries, k, chunk = 64_000, 12, 1_000
    refs = rng.normal(size=(500, 8)).astype(np.float32)
    ref_scores = rng.random(500).astype(np.float32)
    queries = np.lib.format.open_memmap(tmp_path / "queries.npy", mode="w+", dtype=np.float32, shape=(num_queries, 8))
    queries[:] = rng.normal(size=(num_queries, 8))
    mesh = make_mesh(4)
    dist, idx = knn(queries, refs, k=k, query_chunk=chunk, mesh=mesh, engine=engine)
    want = extrapolate(ref_scores, dist, idx, "distance")
    out = np.lib.format.open_memmap(tmp_path / "scores.npy", mode="w+", dtype=np.float32, shape=(num_queries,))
    extrapolate_knn(
        queries, refs, ref_scores, k=k, weighting="distance", query_chunk=chunk, mesh=mesh, engine=engine, out=out
    )  # compiled
    tracemalloc.start()
    got = extrapolate_knn(
        queries, refs, ref_scores, k=k, weighting="distance", query_chunk=chunk, mesh=mesh, engine=engine, out=out
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got is out
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), want)
    neighbours_bytes = num_queries * k * 8
    assert peak < 1024 * chunk < neighbours_bytes / 5, (
        f"{peak} bytes held at once; the neighbours of all queries take {neighbours_bytes}"
    )
    with pytest.raises(ValueError, match="reference scores for 500 references"):
        extrapolate_knn(queries, refs, ref_scores[:-1], k=k, mesh=mesh, engine=engine)


def _reference_extrapolate(encodings_orig, scores_orig, encodings_generated, scores_generated, inference, k, metric):
    """A NumPy port of LS-Dataset-pruning-in-AT's extrapolate.py (commit 552f1c1), scaled_prediction False: the
    references are the originals then the scored generated rows; each inference row gets the mean score of its k
    nearest references (torch.topk over the reference axis: smallest Euclidean distances, largest cosines)."""
    train = np.concatenate([encodings_orig, encodings_generated]).astype(np.float64)
    scores = np.concatenate([scores_orig, scores_generated]).astype(np.float64)
    out = []
    for batch in np.array_split(inference.astype(np.float64), max(1, len(inference) // 16)):  # its batches of 16
        if metric == "cosine sim":
            sim = train @ batch.T / (np.linalg.norm(train, axis=1)[:, None] * np.linalg.norm(batch, axis=1)[None])
            top = np.argsort(-sim, axis=0, kind="stable")[:k]
        else:
            dist = np.linalg.norm(train[:, None, :] - batch[None], axis=2)
            top = np.argsort(dist, axis=0, kind="stable")[:k]
        out.append(scores[top].mean(axis=0))
    return np.concatenate(out)


@pytest.mark.parametrize("engine", ["jax", "faiss"])
@pytest.mark.parametrize("normalize", ["l2", "none"])
def test_extrapolated_scores_equal_the_reference_extrapolate_py(engine, normalize):
    """Originals and a scored generated subset as references, as extrapolate.py has them; with normalize='l2' the
    embedding is unit-length first, as SSCD's output is (so Euclidean ranks like the reference's cosine)."""
    if engine == "faiss" and not faiss_available():
        pytest.skip("faiss is not installed")
    from jax_advprune.pruning.knn import normalize_rows

    rng = np.random.default_rng(3)
    scale = rng.uniform(0.2, 5.0, size=(1, 1))
    orig, generated = rng.normal(size=(150, 24)) * scale, rng.normal(size=(180, 24)) * scale
    pool = rng.normal(size=(333, 24)) * rng.uniform(0.2, 5.0, size=(333, 1))  # norms vary: L2 changes the ranking
    s_orig, s_gen = rng.uniform(size=150), rng.uniform(size=180)
    embed = lambda z: normalize_rows(np.asarray(z, np.float32).copy(), normalize)  # noqa: E731
    ours = extrapolate_knn(
        embed(pool), embed(np.concatenate([orig, generated])), np.concatenate([s_orig, s_gen]).astype(np.float32),
        k=12, metric="euclidean", query_chunk=64, ref_chunk=100, mesh=make_mesh(2), engine=engine,
    )  # fmt: skip
    ref_input = (lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)) if normalize == "l2" else (lambda z: z)
    theirs = _reference_extrapolate(
        ref_input(orig), s_orig, ref_input(generated), s_gen, ref_input(pool), 12, "euclidean distance"
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if normalize == "l2":  # the same ranking as the reference's cosine on the raw features
        cosine = _reference_extrapolate(orig, s_orig, generated, s_gen, pool, 12, "cosine sim")
        np.testing.assert_allclose(ours, cosine, rtol=1e-5, atol=1e-6)
    else:  # and without it, a different one: the option matters on this data
        cosine = _reference_extrapolate(orig, s_orig, generated, s_gen, pool, 12, "cosine sim")
        assert not np.allclose(ours, cosine, atol=1e-3)


def test_normalize_rows_works_in_place_on_a_memory_mapped_embedding(tmp_path):
    from jax_advprune.pruning.knn import normalize_rows

    path = tmp_path / "embedding.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1000, 8))
    rows[:] = np.random.default_rng(0).normal(size=(1000, 8)) * 3
    rows[7] = 0.0  # a zero row stays zero
    assert normalize_rows(rows, "l2", chunk=128) is rows
    rows.flush()
    saved = np.load(path)
    norms = np.linalg.norm(saved, axis=1)
    np.testing.assert_allclose(np.delete(norms, 7), 1.0, rtol=1e-6)
    assert norms[7] == 0.0
    with pytest.raises(ValueError, match="normalization"):
        normalize_rows(saved, "l1")


def test_check_extrapolation_refuses_a_bad_fraction_or_a_directory_without_an_extrapolation(tmp_path, capsys):
    from jax_advprune import check_extrapolation

    assert check_extrapolation.main(["--workdir", str(tmp_path), "--holdout_fraction", "2"]) == 2
    assert "--holdout_fraction must lie in (0, 1)" in capsys.readouterr().err
    assert check_extrapolation.main(["--workdir", str(tmp_path)]) == 2
    assert "has no finished extrapolation" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
