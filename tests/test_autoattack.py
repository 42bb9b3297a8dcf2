"""FAB-T, Square and AutoAttack against torchattacks on the same weights, their invariants, and the public API's compile-once.

The model is what a user brings: a plain `lax.conv` CNN on 16x16x3 images,
trained for 150 steps on class templates plus noise, and the same network
written in PyTorch with the weights copied (outputs checked equal). The model
and the comparison are benchmarks/autoattack_agreement.py's, which runs it on
32x32x3 images for docs/attacks.md.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jax_advprune.attacks import apgd, autoattack, deepfool, fab, pgd, square
from jax_advprune.attacks.common import flat_norm

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import autoattack_agreement as agreement  # noqa: E402  (the benchmark owns the model and the comparison)

SIDE, N = 16, 256
STEPS, QUERIES = 10, 300  # both sides, per component
EPS = agreement.EPS  # near the 40th percentile of the clean samples' DeepFool distances
plain_cnn, robust_accuracy, torch_robust_accuracy = (
    agreement.plain_cnn,
    agreement.robust_accuracy,
    agreement.torch_robust_accuracy,
)


@pytest.fixture(scope="module")
def trained():
    """(logits_fn as a Partial, torch twin, x (N, 16, 16, 3) float32, y (N,)): test images the model gets right mostly."""
    return agreement.trained_plain_cnn(SIDE, N)


def within_noise(ours, theirs, n=N):
    return agreement.within_noise(ours, theirs, n)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_each_component_matches_torchattacks_on_a_trained_model(trained, norm):
    """benchmarks/autoattack_agreement.py's comparison on 16x16 images, and each component's own invariants."""
    logits_fn, twin, x, y = trained
    eps, key = EPS[norm], jax.random.PRNGKey(1)
    clean = float(np.mean(np.asarray(jnp.argmax(logits_fn(x), -1)) == y))
    rows = []
    for name, (ours, theirs) in agreement.component_pairs(logits_fn, twin, x, y, eps, norm, STEPS, QUERIES).items():
        torch.manual_seed(0)
        rows.append((name, ours(), theirs()))
    print(
        f"\n{norm} eps {eps:.4f}, clean {clean:.3f}: "
        + ", ".join(f"{n} ours {a:.3f} torchattacks {b:.3f}" for n, a, b in rows)
    )
    assert 0.15 < rows[0][2] < clean - 0.15, "eps must leave the comparison informative"
    for name, ours, theirs in rows:
        assert within_noise(ours, theirs), (name, ours, theirs)

    # Square's budget counts every forward pass a sample gets; a sample never fooled spends all of it. Same key, same result.
    searched = square(logits_fn, x, y, key, eps=eps, norm=norm, queries=QUERIES)
    spent = np.asarray(searched.queries)
    assert spent.max() <= QUERIES and spent.min() >= 1 and np.all(spent[~np.asarray(searched.fooled)] == QUERIES)
    np.testing.assert_array_equal(
        searched.x_adv, square(logits_fn, x, y, key, eps=eps, norm=norm, queries=QUERIES).x_adv
    )
    minimal = fab(logits_fn, x, y, key, eps=eps, norm=norm, steps=STEPS)
    found = np.isfinite(np.asarray(minimal.distance))
    np.testing.assert_allclose(
        np.asarray(minimal.distance)[found], np.asarray(flat_norm(minimal.x_adv - x, norm))[found], rtol=1e-5, atol=1e-7
    )
    misclassified = np.asarray(jnp.argmax(logits_fn(minimal.x_adv), -1)) != y
    np.testing.assert_array_equal(np.asarray(minimal.fooled), misclassified & (np.asarray(minimal.distance) <= eps))
    ascended = apgd(logits_fn, x, y, key, eps=eps, steps=STEPS, norm=norm)
    for name, x_adv in {"APGD-CE": ascended, "FAB-T": minimal.x_adv, "Square": searched.x_adv}.items():
        assert float(np.min(x_adv)) >= 0 and float(np.max(x_adv)) <= 1, name
        if name != "FAB-T":  # FAB returns its smallest adversarial point, which may lie beyond eps
            assert np.all(np.asarray(flat_norm(jnp.asarray(x_adv - x), norm)) <= eps + 1e-5), name


@pytest.mark.slow
def test_standard_autoattack_matches_torchattacks_autoattack(trained, norm="linf"):
    """Same settings as torchattacks' 'standard' (its APGD, APGD-T and FAB take 10 steps; the reference's 100 are our
    defaults), same weights; ours checks every candidate and keeps the first success per sample."""
    logits_fn, twin, x, y = trained
    eps = EPS[norm]
    ours = autoattack(
        logits_fn, x, y, jax.random.PRNGKey(2), eps=eps, norm=norm, apgd_steps=10, fab_steps=10, batch_size=N
    )
    assert ours.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert np.all(np.diff(ours.robust_accuracy) <= 0) and ours.robust_accuracy[0] <= ours.clean_accuracy
    broken = ~ours.robust & ours.clean_correct
    assert np.all(ours.broken_by[broken] >= 0) and np.all(ours.broken_by[~broken] == -1)
    assert np.all(np.asarray(jnp.argmax(logits_fn(ours.x_adv[broken]), -1)) != y[broken])
    assert np.all(np.asarray(flat_norm(jnp.asarray(ours.x_adv - x), norm)) <= eps + 1e-5)
    assert robust_accuracy(logits_fn, x, ours.x_adv, y, eps, norm) == pytest.approx(ours.robust_accuracy[-1])
    torch.manual_seed(0)
    theirs = agreement.standard_autoattack_pair(logits_fn, twin, x, y, eps, norm)[1]()
    print(f"\n{norm}: ours {ours.robust_accuracy} torchattacks.AutoAttack {theirs:.3f}")
    assert within_noise(ours.robust_accuracy[-1], theirs)


def test_fab_projections_equal_the_reference_ones():
    from torchattacks.attacks.fab import projection_l2, projection_linf

    from jax_advprune.attacks.fab import project_l2, project_linf

    rng = np.random.default_rng(4)
    t = rng.uniform(0, 1, (64, 300)).astype(np.float32)
    w = rng.normal(size=(64, 300)).astype(np.float32)
    w[:, :5] *= rng.uniform(size=(64, 1)) > 0.5  # zero weights on some rows
    b = (rng.normal(size=64) * np.abs(w).sum(1) * 0.3 + (w * t).sum(1)).astype(np.float32)
    for ours, reference in ((project_linf, projection_linf), (project_l2, projection_l2)):
        np.testing.assert_allclose(
            np.asarray(ours(t, w, b)), reference(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy(), atol=1e-5
        )


@pytest.mark.slow
def test_the_public_attacks_compile_once_per_shape_when_called_directly(trained):
    """A user's plain function called twice with the same shapes: the second call compiles nothing and, with
    the same key, returns the same result."""
    logits_fn, _, x, y = trained
    x, y = x[:32], y[:32]
    key = jax.random.PRNGKey(5)
    calls = {
        "pgd": lambda: pgd(logits_fn, x, y, key, eps=0.03, step_size=0.01, steps=3),
        "apgd": lambda: apgd(logits_fn, x, y, key, eps=0.03, steps=3),
        "deepfool": lambda: deepfool(logits_fn, x, y, norm="linf", max_iter=5),
        "fab": lambda: fab(logits_fn, x, y, key, eps=0.03, steps=2, num_targets=1),
        "square": lambda: square(logits_fn, x, y, key, eps=0.03, queries=5),
        "autoattack": lambda: autoattack(
            logits_fn, x, y, key, eps=0.03, apgd_steps=2, num_targets=1, fab_steps=2, square_queries=5
        ),
    }
    compiles = []

    class Counter(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                compiles.append(record.getMessage())

    counter = Counter(logging.DEBUG)
    logging.getLogger("jax").addHandler(counter)
    try:
        for name, call in calls.items():
            first = jax.block_until_ready(call())
            compiles.clear()
            with jax.log_compiles():
                again = jax.block_until_ready(call())
            assert compiles == [], (name, compiles[:3])
            for a, b in zip(
                jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)
            ):  # and the same key gives the same result
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        new_weights = Partial(plain_cnn, jax.tree_util.tree_map(lambda a: a * 1.01, logits_fn.args[0]))
        with jax.log_compiles():  # a Partial's weights are arguments: new weights, same program
            jax.block_until_ready(pgd(new_weights, x, y, key, eps=0.03, step_size=0.01, steps=3))
        assert compiles == []
    finally:
        logging.getLogger("jax").removeHandler(counter)


def test_autoattack_refuses_bad_input_before_spending_compute():
    def logits_fn(x):
        return x.reshape(x.shape[0], -1)[:, :10]

    x, y = np.zeros((4, 8, 6, 3), np.float32), np.zeros(4, np.int32)
    key = jax.random.PRNGKey(0)
    for kwargs, message in [
        (dict(version="standrd"), "version must be one of"),
        (dict(version="custom"), "needs attacks"),
        (dict(version="custom", attacks=["apgd-ce", "fab"]), "distinct names"),
        (dict(attacks=["square"]), "only for version='custom'"),
        (dict(), "Square needs square images"),
        (dict(eps=0.0), "eps > 0"),
        (dict(square_queries=0), "square_queries must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            autoattack(logits_fn, x, y, key, **{"eps": 0.03, **kwargs})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        autoattack(logits_fn, x, np.full(4, 10), key, eps=0.03, version="lite")


@pytest.mark.slow
def test_an_interrupted_autoattack_resumes_from_its_saved_passes_to_the_same_result(trained):
    logits_fn, _, x, y = trained
    x, y = x[:32], y[:32]
    key = jax.random.PRNGKey(5)
    settings = dict(eps=0.03, apgd_steps=2, num_targets=1, fab_steps=2, square_queries=5)  # the compile test's programs
    whole = autoattack(logits_fn, x, y, key, **settings)
    saved = []

    def killed_after_two(k, hits):
        saved.append(hits)
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autoattack(logits_fn, x, y, key, on_pass=killed_after_two, **settings)
    later = []
    resumed = autoattack(logits_fn, x, y, key, done_passes=saved, on_pass=lambda k, hits: later.append(k), **settings)
    assert later == [2, 3]  # FAB-T and Square: APGD-CE and APGD-T came from the saved passes
    np.testing.assert_array_equal(resumed.x_adv, whole.x_adv)
    np.testing.assert_array_equal(resumed.broken_by, whole.broken_by)
    assert resumed.robust_accuracy == whole.robust_accuracy and len(saved[0]["rows"]) > 0
