"""APGD: the reference checkpoint schedule, invariants, determinism, and strength vs PGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_advprune.attacks.apgd import apgd, checkpoints, dlr_loss, targeted_dlr_loss
from jax_advprune.attacks.common import flat_norm
from jax_advprune.evaluation import autoattack_evaluator, pgd_evaluator
from jax_advprune.parallel import make_mesh


def test_checkpoint_schedule_matches_the_reference_for_100_iterations():
    # autoattack: first check after int(0.22 N) = 22 iterations, then 19, 16, 13, 10, 7, 6, 6, ...
    assert checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]


def test_dlr_losses_on_hand_computed_logits():
    logits = jnp.array([[4.0, 3.0, 1.0, 0.0]])
    y = jnp.array([0])
    np.testing.assert_allclose(dlr_loss(logits, y), [-(4.0 - 3.0) / (4.0 - 1.0)])
    np.testing.assert_allclose(targeted_dlr_loss(logits, y, jnp.array([2])), [-(4.0 - 1.0) / (4.0 - 0.5)])


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained (clean) on sklearn digits in [0, 1]: (apply_fn, params, x (N, 8, 8, 1), y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)[:512]
    y = digits.target.astype(np.int32)[:512]
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(key1, (64, 64)) * 0.1, "w2": jax.random.normal(key2, (64, 10)) * 0.1}

    def apply_fn(p, z):
        return jax.nn.relu(z.reshape(z.shape[0], -1) @ p["w1"]) @ p["w2"]

    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(apply_fn(q, x), y).mean())(p)
        u, o = tx.update(g, o)
        return optax.apply_updates(p, u), o

    for _ in range(200):
        params, opt = step(params, opt)
    assert np.mean(np.asarray(apply_fn(params, x)).argmax(1) == y) > 0.95
    return apply_fn, params, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_apgd_stays_in_ball_and_is_deterministic(digits_mlp, norm, eps):
    apply_fn, params, x, y = digits_mlp
    logits_fn = lambda z: apply_fn(params, z)  # noqa: E731
    run = jax.jit(lambda k: apgd(logits_fn, x[:64], y[:64], k, eps=eps, steps=20, norm=norm))
    x_adv = np.asarray(run(jax.random.PRNGKey(1)))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(np.asarray(flat_norm(jnp.asarray(x_adv - x[:64]), norm)) <= eps + 1e-5)
    np.testing.assert_array_equal(x_adv, np.asarray(run(jax.random.PRNGKey(1))))


@pytest.mark.slow
def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_model(digits_mlp):
    apply_fn, params, x, y = digits_mlp
    images = np.round(x * 255).astype(np.uint8)
    mesh = make_mesh(2)
    common = dict(eps=0.08, norm="linf", batch_size=128, mesh=mesh)
    pgd_acc = pgd_evaluator(apply_fn, step_size=0.02, steps=10, **common)(params, images, y)["pgd_accuracy"]
    aa = autoattack_evaluator(
        apply_fn, version="autoattack_lite", apgd_steps=25, num_targets=2, fab_steps=1, square_queries=1, **common
    )(params, images, y)
    assert 0.0 < aa["autoattack_lite_accuracy"] <= aa["apgd_ce_accuracy"] <= aa["clean_accuracy"]
    assert aa["apgd_ce_accuracy"] <= pgd_acc
    assert aa["autoattack_lite_accuracy"] < pgd_acc
