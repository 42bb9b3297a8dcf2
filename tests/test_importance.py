"""Importance scores on cases with known answers."""

import numpy as np
import pytest

from jax_advprune.pruning import importance


def test_el2n_of_a_perfect_prediction_is_zero_and_of_a_confident_mistake_sqrt2():
    labels = np.array([0, 1, 2])
    probs = np.eye(3)[[0, 1, 0]]
    np.testing.assert_allclose(importance.el2n(probs, labels), [0, 0, np.sqrt(2)], atol=1e-6)
    uniform = np.full((1, 4), 0.25)
    assert importance.el2n(uniform, np.array([1]))[0] == pytest.approx(np.sqrt(0.75**2 + 3 * 0.25**2))


def test_grand_last_layer_equals_the_autodiff_gradient_norm_of_a_dense_head():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    features, kernel, bias = rng.normal(size=(5, 7)), rng.normal(size=(7, 3)), rng.normal(size=3)
    labels = rng.integers(0, 3, 5)

    def loss(params, h, y):
        logits = h @ params[0] + params[1]
        return -jax.nn.log_softmax(logits)[y]

    norms = []
    for h, y in zip(features, labels):
        g = jax.grad(loss)((jnp.asarray(kernel), jnp.asarray(bias)), jnp.asarray(h), y)
        norms.append(np.sqrt(sum(float(jnp.sum(t**2)) for t in g)))
    probs = np.asarray(jax.nn.softmax(features @ kernel + bias))
    np.testing.assert_allclose(importance.grand_last_layer(probs, labels, features), norms, rtol=1e-5)


def test_forgetting_counts_events_on_a_scripted_history():
    correct = np.array(
        [
            [1, 0, 1, 0],
            [0, 1, 1, 0],
            [1, 0, 1, 0],
            [0, 1, 1, 0],
        ],
        bool,
    )
    # sample 0: 1->0, 1->0 = 2; sample 1: 1->0 once = 1; sample 2: never forgotten; sample 3: never learned
    np.testing.assert_array_equal(importance.forgetting_events(correct), [2, 1, 0, 4])
    np.testing.assert_array_equal(importance.forgetting_events(correct, never_learned=-1), [2, 1, 0, -1])


def test_du_and_fp_of_a_constant_history_are_zero_and_follow_their_formulas():
    constant = np.full((12, 3), 0.7)
    np.testing.assert_allclose(importance.dynamic_uncertainty(constant, window=10), 0, atol=1e-7)
    np.testing.assert_allclose(importance.frequency_score(constant), 0, atol=1e-9)
    history = np.random.default_rng(0).random((13, 2))
    expected_du = np.mean([np.std(history[k : k + 10], axis=0, ddof=1) for k in range(4)], axis=0)
    np.testing.assert_allclose(importance.dynamic_uncertainty(history, window=10), expected_du, rtol=1e-5)
    alternating = np.tile([[0.0], [1.0]], (4, 1))  # E = 8: FFT = [4, 0, 0, 0, -4, 0, 0, 0]
    assert importance.frequency_score(alternating)[0] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least window=10"):
        importance.dynamic_uncertainty(history[:5])


def test_random_scores_are_reproducible():
    np.testing.assert_array_equal(importance.random_scores(5, 1), importance.random_scores(5, 1))
    assert not np.array_equal(importance.random_scores(5, 1), importance.random_scores(5, 2))


@pytest.mark.parametrize(
    "protocol,scope,groups",
    [
        ("mixed", "synthetic", None),
        ("reference", "all", ["original", "synthetic"]),
        ("reference", "synthetic", ["synthetic"]),
    ],
)
def test_history_protocols_score_the_groups_the_reference_trains(protocol, scope, groups):
    """The reference protocol trains originals and synthetic rows in separate runs, and with scope 'synthetic'
    (originals never pruned) none on the originals; the mixed protocol scores originals and subset together."""
    from types import SimpleNamespace

    from configs import default
    from jax_advprune.phases import score

    config = default.get_config()
    config.scoring.score, config.scoring.history_protocol, config.pruning.scope = "du", protocol, scope
    config.scoring.extrapolation.enabled, config.scoring.extrapolation.subset_size = True, 40
    is_synthetic = np.arange(300) >= 100
    trainable = np.arange(300) >= 10  # the first 10 originals: the validation slice
    data = SimpleNamespace(trainable=trainable, pool=SimpleNamespace(is_synthetic=is_synthetic))
    scored = score.scored_indices(config, data)
    assert np.all(np.diff(scored) > 0) and trainable[scored].all() and is_synthetic[scored].sum() == 40
    originals = 0 if scope == "synthetic" and protocol == "reference" else 90
    assert (~is_synthetic[scored]).sum() == originals
    if groups is not None:
        split = score.history_groups(data, scored)
        assert [name for name, _ in split] == groups
        np.testing.assert_array_equal(np.sort(np.concatenate([rows for _, rows in split])), scored)
    run_config = score.pass_config(config)
    assert (
        run_config.train.original_fraction == 0
        and run_config.train.validation_every_epochs == 1
        and config.train.original_fraction == 0.3
    )
