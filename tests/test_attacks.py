"""Attack tests against analytic answers and invariants."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_advprune import preemption
from jax_advprune.attacks import deepfool, pgd
from jax_advprune.attacks.common import flat_norm
from jax_advprune.attacks.deepfool import STEP_SLACK

IMAGE_SHAPE = (4, 4, 1)
NUM_CLASSES = 5


def affine_classifier(seed: int, scale: float = 3.0, num_classes: int = NUM_CLASSES):
    """Returns (logits_fn, W (D, K), b (K,)) of an affine classifier on flattened images."""
    rng = np.random.default_rng(seed)
    dims = int(np.prod(IMAGE_SHAPE))
    weights = rng.normal(size=(dims, num_classes)).astype(np.float32) * scale
    bias = rng.normal(size=num_classes).astype(np.float32)

    def logits_fn(x):
        return x.reshape(x.shape[0], -1) @ weights + bias

    return logits_fn, weights, bias


def analytic_distance(x, weights, bias, dual_ord):
    """min_{k != pred} |f_k - f_pred| / ||w_k - w_pred||_dual per sample, in numpy."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    logits = flat @ weights + bias
    pred = logits.argmax(1)
    out = []
    for i, p in enumerate(pred):
        gaps = np.abs(logits[i] - logits[i, p])
        norms = np.linalg.norm((weights - weights[:, [p]]).T, ord=dual_ord, axis=1)
        ratios = np.where(np.arange(weights.shape[1]) == p, np.inf, gaps / np.maximum(norms, 1e-30))
        out.append(ratios.min())
    return np.array(out), pred


@pytest.mark.parametrize(
    "norm,dual_ord,num_classes", [("l2", 2, NUM_CLASSES), ("linf", 1, NUM_CLASSES), ("l2", 2, 100)]
)
def test_deepfool_matches_analytic_distance_on_affine_classifier(norm, dual_ord, num_classes):
    logits_fn, weights, bias = affine_classifier(seed=0, num_classes=num_classes)
    rng = np.random.default_rng(1)
    x = (0.5 + rng.uniform(-0.05, 0.05, size=(64,) + IMAGE_SHAPE)).astype(np.float32)
    expected, pred = analytic_distance(x, weights, bias, dual_ord)
    labels = pred.copy()
    labels[::3] = (pred[::3] + 1) % num_classes  # every third sample is misclassified

    result = jax.jit(lambda a, b: deepfool(logits_fn, a, b, norm=norm, overshoot=0.02))(x, labels)

    x_adv = np.asarray(result.x_adv)
    assert np.all((x_adv > 0) & (x_adv < 1)), "the test needs clipping inactive"
    assert np.all(result.converged)
    np.testing.assert_array_equal(result.n_iter, 1)  # one exact linear step
    # each step adds the documented STEP_SLACK to the linearised distance
    np.testing.assert_allclose(result.distance, expected, rtol=1e-3, atol=STEP_SLACK)
    misclassified = labels != pred
    assert np.all(np.asarray(result.margin)[misclassified] < 0)
    np.testing.assert_allclose(
        np.asarray(result.margin)[~misclassified], expected[~misclassified], rtol=1e-3, atol=STEP_SLACK
    )
    # the prediction at x_adv really changed, and x_adv is (1 + overshoot) r_total away
    assert np.all(np.asarray(logits_fn(x_adv)).argmax(1) != pred)
    np.testing.assert_allclose(flat_norm(jnp.asarray(x_adv - x), norm), 1.02 * np.asarray(result.distance), rtol=1e-4)


def test_deepfool_candidates_restrict_to_top_classes():
    logits_fn, weights, bias = affine_classifier(seed=2)
    x = np.full((8,) + IMAGE_SHAPE, 0.5, np.float32) + np.random.default_rng(3).uniform(
        -0.05, 0.05, (8,) + IMAGE_SHAPE
    ).astype(np.float32)
    labels = np.asarray(logits_fn(x)).argmax(1)
    full = deepfool(logits_fn, x, labels, norm="l2")
    top2 = deepfool(logits_fn, x, labels, norm="l2", candidates=2)
    # fewer candidates can only find a boundary at least as far away
    assert np.all(np.asarray(top2.distance) >= np.asarray(full.distance) * (1 - 1e-5))


def test_deepfool_reports_unconverged_samples():
    logits_fn, _, _ = affine_classifier(seed=4)
    x = np.full((4,) + IMAGE_SHAPE, 0.5, np.float32)
    labels = np.zeros(4, np.int32)
    result = deepfool(logits_fn, x, labels, norm="l2", max_iter=0)
    assert not np.any(result.converged)
    np.testing.assert_array_equal(result.n_iter, 0)
    np.testing.assert_array_equal(result.distance, 0.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_per_sample_ball_and_unit_box(norm):
    logits_fn, _, _ = affine_classifier(seed=5)
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, size=(16,) + IMAGE_SHAPE).astype(np.float32)
    x[:4] = 0.0  # corners exercise the [0, 1] clip
    x[4:8] = 1.0
    y = rng.integers(0, NUM_CLASSES, 16)
    eps = np.linspace(0.0, 0.5 if norm == "linf" else 2.0, 16).astype(np.float32)
    x_adv = pgd(logits_fn, x, y, jax.random.key(0), eps=eps, step_size=eps / 4, steps=10, norm=norm)
    x_adv = np.asarray(x_adv)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    dist = np.asarray(flat_norm(jnp.asarray(x_adv - x), norm))
    assert np.all(dist <= eps + 1e-5)
    assert dist[0] == 0.0  # eps 0 means the clean input
    assert np.all(dist[8:] > 0.5 * eps[8:])  # and it actually moved


def test_pgd_increases_loss_on_affine_classifier():
    logits_fn, _, _ = affine_classifier(seed=7)
    rng = np.random.default_rng(8)
    x = rng.uniform(0.3, 0.7, size=(32,) + IMAGE_SHAPE).astype(np.float32)
    y = np.asarray(logits_fn(x)).argmax(1)
    x_adv = pgd(logits_fn, x, y, jax.random.key(1), eps=0.1, step_size=0.025, steps=10, random_start=False)
    from jax_advprune.attacks.objectives import cross_entropy

    assert np.all(np.asarray(cross_entropy(logits_fn(x_adv), y)) >= np.asarray(cross_entropy(logits_fn(x), y)) - 1e-6)


def tiny_mlp(seed: int):
    """A nonlinear classifier whose DeepFool iteration counts differ between samples."""
    rng = np.random.default_rng(seed)
    dims = int(np.prod(IMAGE_SHAPE))
    w1 = rng.normal(size=(dims, 32)).astype(np.float32)
    w2 = rng.normal(size=(32, NUM_CLASSES)).astype(np.float32)

    def logits_fn(x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 4.0) @ w2 * 3.0

    return logits_fn


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_work_queue_gives_each_sample_its_solo_result(norm):
    logits_fn = tiny_mlp(seed=9)
    rng = np.random.default_rng(10)
    x = rng.uniform(0, 1, size=(24,) + IMAGE_SHAPE).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, 24)
    queued = jax.jit(lambda a, b: deepfool(logits_fn, a, b, norm=norm, max_iter=20, slots=5))(x, y)
    assert len(np.unique(np.asarray(queued.n_iter))) > 1, "the test needs samples of different difficulty"
    solo_fn = jax.jit(lambda a, b: deepfool(logits_fn, a, b, norm=norm, max_iter=20))
    for i in range(len(x)):
        solo = solo_fn(x[i : i + 1], y[i : i + 1])
        assert int(solo.n_iter[0]) == int(queued.n_iter[i])
        assert bool(solo.converged[0]) == bool(queued.converged[i])
        np.testing.assert_allclose(queued.distance[i], solo.distance[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(queued.margin[i], solo.margin[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(queued.x_adv[i], solo.x_adv[0], atol=1e-5)  # matmul round-off differs by batch shape


def binary_linear(seed: int):
    """Two-class affine model with logits (0, w.x + b); returns (logits_fn, w (D,))."""
    w = np.random.default_rng(seed).normal(size=int(np.prod(IMAGE_SHAPE))).astype(np.float32)

    def logits_fn(x):
        z = x.reshape(x.shape[0], -1) @ w + 0.1
        return jnp.stack([jnp.zeros_like(z), z], axis=-1)

    return logits_fn, w


@pytest.mark.parametrize("norm,random_start", [("linf", True), ("l2", False)])
def test_pgd_finds_the_closed_form_optimum_of_a_linear_binary_model(norm, random_start):
    """For label 0 the CE loss grows with w.x, so the optimum is eps sign(w) (linf) or eps w/||w|| (l2)."""
    logits_fn, w = binary_linear(11)
    x = np.full((3,) + IMAGE_SHAPE, 0.5, np.float32)
    y = np.zeros(3, np.int32)
    eps = 0.2
    x_adv = pgd(
        logits_fn, x, y, jax.random.key(2), eps=eps, step_size=eps / 4, steps=12, norm=norm, random_start=random_start
    )
    direction = np.sign(w) if norm == "linf" else w / np.linalg.norm(w)
    expected = x.reshape(3, -1) + eps * direction
    np.testing.assert_allclose(np.asarray(x_adv).reshape(3, -1), expected, atol=1e-5)


@pytest.mark.slow
def test_pgd_targeted_reaches_the_target_and_restarts_keep_the_worst_case():
    from jax_advprune.attacks.objectives import cw_margin

    affine_fn, _, _ = affine_classifier(seed=12)
    rng = np.random.default_rng(13)
    x = rng.uniform(0.3, 0.7, size=(32,) + IMAGE_SHAPE).astype(np.float32)
    target = (np.asarray(affine_fn(x)).argmax(1) + 1) % NUM_CLASSES
    x_t = pgd(affine_fn, x, target, jax.random.key(0), eps=0.3, step_size=0.05, steps=20, targeted=True)
    np.testing.assert_array_equal(np.asarray(affine_fn(x_t)).argmax(1), target)

    logits_fn = tiny_mlp(seed=12)
    x = rng.uniform(0, 1, size=(32,) + IMAGE_SHAPE).astype(np.float32)
    y = np.asarray(logits_fn(x)).argmax(1)

    key = jax.random.key(3)
    kwargs = dict(
        eps=0.05, step_size=0.0125, steps=5, loss="cw_margin", mesh=None
    )  # one device: the restarts' keys are the caller's
    single = pgd(logits_fn, x, y, jax.random.fold_in(key, 0), **kwargs)  # the first restart's own run
    best = pgd(logits_fn, x, y, key, restarts=4, **kwargs)
    gain = np.asarray(cw_margin(logits_fn(best), y)) - np.asarray(cw_margin(logits_fn(single), y))
    assert np.all(gain >= -1e-6) and np.any(gain > 0)
    np.testing.assert_array_equal(best, pgd(logits_fn, x, y, key, restarts=4, **kwargs))  # deterministic per key


def test_margins_over_a_pool_on_four_devices_equal_one_device(small_pool):
    """The sharded work-queue scorer returns the same margins whatever the device count."""
    from jax_advprune.parallel import make_mesh
    from jax_advprune.pruning.margins import margin_scores

    pool, _, _ = small_pool  # 200 samples of 8x8x1
    rng = np.random.default_rng(14)
    w1 = rng.normal(size=(64, 32)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(32, NUM_CLASSES)).astype(np.float32)

    def apply_fn(variables, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ variables["w1"] - 1.0) @ variables["w2"]

    variables = {"w1": w1, "w2": w2}
    results = [
        margin_scores(apply_fn, variables, pool, slots=16, chunk_size=64, mesh=make_mesh(devices), **DEEPFOOL_L2)
        for devices in (1, 4)
    ]
    assert len(np.unique(results[0]["n_iter"])) > 1
    np.testing.assert_array_equal(results[0]["n_iter"], results[1]["n_iter"])
    np.testing.assert_array_equal(results[0]["converged"], results[1]["converged"])
    np.testing.assert_allclose(results[0]["margin"], results[1]["margin"], rtol=1e-5, atol=1e-6)


DEEPFOOL_L2 = dict(norm="l2", max_iter=30, overshoot=0.02, candidates=None)


def test_killed_or_preempted_margin_scoring_resumes_without_recomputing_finished_chunks(
    small_pool, tmp_path, monkeypatch
):
    from jax_advprune.parallel import make_mesh
    from jax_advprune.pruning import margins

    pool, _, _ = small_pool
    rng = np.random.default_rng(15)
    variables = {"w": rng.normal(size=(64, NUM_CLASSES)).astype(np.float32)}
    mesh = make_mesh(2)

    def apply_fn(v, x):
        return x.reshape(x.shape[0], -1) @ v["w"]

    def scores(**kwargs):
        return margins.margin_scores(
            apply_fn, variables, pool, slots=16, chunk_size=48, mesh=mesh, **DEEPFOOL_L2, **kwargs
        )

    straight = scores()
    calls = []
    deepfool = margins.deepfool

    def dying(logits_fn, x, y, **kwargs):  # killed while computing the third chunk
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return deepfool(logits_fn, x, y, **kwargs)

    monkeypatch.setattr(margins, "deepfool", dying)
    with pytest.raises(KeyboardInterrupt):
        scores(resume_dir=str(tmp_path / "chunks"))
    assert sorted(os.listdir(tmp_path / "chunks")) == ["chunk_000000.npz", "chunk_000001.npz"]

    def preempted(logits_fn, x, y, **kwargs):  # resumed, then a SIGTERM arrives while the third chunk is computed
        os.kill(os.getpid(), signal.SIGTERM)
        return deepfool(logits_fn, x, y, **kwargs)

    monkeypatch.setattr(margins, "deepfool", preempted)
    preemption.install()
    try:
        with pytest.raises(preemption.Preempted, match="3 chunks of 48 rows saved"):
            scores(resume_dir=str(tmp_path / "chunks"))
    finally:
        preemption.uninstall()
    assert len(os.listdir(tmp_path / "chunks")) == 3
    calls.clear()
    monkeypatch.setattr(
        margins,
        "deepfool",
        lambda logits_fn, x, y, **kwargs: calls.append(len(x)) or deepfool(logits_fn, x, y, **kwargs),
    )
    resumed = scores(resume_dir=str(tmp_path / "chunks"))
    assert len(calls) == 2  # chunks 4 and 5 of ceil(200 / 48) = 5
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_square_stays_in_the_ball_and_the_box_counts_its_queries_and_only_improves_the_margin(norm, eps):
    """Square on an affine classifier (8x8x1 images): every candidate inside the eps-ball and [0, 1], at most the
    query budget per sample, `fooled` exactly where the result is misclassified, and the CW margin of the result
    never below the clean one's (Square keeps a point only when the margin loss improves)."""
    from jax_advprune.attacks import square
    from jax_advprune.attacks.objectives import cw_margin

    weights = jnp.asarray(np.random.default_rng(3).normal(size=(64, NUM_CLASSES)).astype(np.float32))

    def logits_fn(images):
        return images.reshape(images.shape[0], -1) @ weights

    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1))
    y = jnp.argmax(logits_fn(x), -1)
    result = square(logits_fn, x, y, jax.random.PRNGKey(2), eps=eps, norm=norm, queries=40, mesh=None)
    delta = np.asarray(result.x_adv - x).reshape(16, -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps * (1 + 1e-5)) and float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert np.all((np.asarray(result.queries) >= 1) & (np.asarray(result.queries) <= 40))
    logits = logits_fn(result.x_adv)
    np.testing.assert_array_equal(np.asarray(result.fooled), np.asarray(jnp.argmax(logits, -1) != y))
    gained = np.asarray(cw_margin(logits, y)) - np.asarray(cw_margin(logits_fn(x), y))
    assert np.all(gained >= -1e-5) and np.any(gained > 1e-2)  # never worse, and it did move some samples
