"""Training: a resumed run equals an uninterrupted one; EMA and weight-decay details."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax_advprune import training
from jax_advprune.checkpoint import Checkpointer, abstract_like
from jax_advprune.data.loader import BatchReader, batch_iterator, make_plan
from jax_advprune.metrics import Progress
from jax_advprune.models import create_model
from jax_advprune.parallel import make_mesh

NUM_STEPS = 6


def _config():
    cfg = ml_collections.ConfigDict(dict(
        lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_steps=2,
        label_smoothing=0.1, ema_decay=0.995, ema_warmup_steps=0, loss="pgd_at", trades_beta=6.0,
    ))
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=0.1, step_size=0.05, steps=2))
    return cfg, attack


@pytest.fixture(scope="module")
def setup():
    cfg, attack = _config()
    model = create_model("small_cnn", num_classes=10, widths=(8, 16))
    tx = training.make_optimizer(cfg, NUM_STEPS)
    step_fn = training.make_train_step(model, tx, cfg, attack, make_mesh(2))
    return model, tx, step_fn


class Interrupted(Exception):
    pass


def _run(setup, pool, ckpt_dir, *, stop_after=None):
    model, tx, step_fn = setup
    n = len(pool)
    plan = make_plan(np.ones(n, bool), pool.num_original, batch_size=16, original_fraction=0.25, synthetic_with_replacement=True, seed=0)
    reader = BatchReader(pool, plan, np.full(n, 0.1, np.float32), crop_padding=1)
    batches = batch_iterator(reader, NUM_STEPS)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    checkpointer = Checkpointer(str(ckpt_dir), max_to_keep=2)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state), batches)

    def train_step(state, batch):  # dies like a killed run after `stop_after` steps
        if stop_after is not None and int(state.step) == stop_after:
            raise Interrupted
        return step_fn(state, batch)

    try:
        state = training.fit(state, train_step, batches, num_steps=NUM_STEPS, checkpointer=checkpointer,
                             checkpoint_every=2, progress=Progress("t", NUM_STEPS, 16), log_every_steps=1)
    finally:
        checkpointer.wait()
        checkpointer.close()
    return state


def test_resumed_training_matches_uninterrupted_bitwise(setup, small_pool, tmp_path):
    pool, _, _ = small_pool
    straight = _run(setup, pool, tmp_path / "a")
    with pytest.raises(Interrupted):
        _run(setup, pool, tmp_path / "b", stop_after=3)  # checkpoint at step 2, step 3 lost
    resumed = _run(setup, pool, tmp_path / "b")
    assert int(resumed.step) == int(straight.step) == NUM_STEPS
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weight_decay_mask_spares_batchnorm_and_biases(setup):
    model, tx, _ = setup
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    mask = training.decay_mask(params)
    assert mask["conv0"]["kernel"] and mask["head"]["kernel"]
    assert not mask["bn0"]["scale"] and not mask["bn0"]["bias"] and not mask["head"]["bias"]


def test_ema_decay_follows_the_reference_warmup():
    decays = [float(training.ema_decay(jnp.asarray(s), 0.995, 0)) for s in (0, 1, 10, 10_000)]
    assert decays[0] == 0.0
    assert decays[1] == pytest.approx(2.0 / 11.0)  # (1 + d) / (10 + d), d = step - warmup
    assert decays[2] == pytest.approx(11.0 / 20.0)
    assert decays[3] == pytest.approx(0.995)


def test_four_devices_give_the_one_device_update(setup, small_pool):
    model, tx, _ = setup
    cfg, attack = _config()
    pool, _, _ = small_pool
    plan = make_plan(np.ones(len(pool), bool), pool.num_original, batch_size=16, original_fraction=0.25, synthetic_with_replacement=True, seed=0)
    batch = BatchReader(pool, plan, np.linspace(0, 0.1, len(pool)).astype(np.float32), crop_padding=1)(0)
    states = []
    for devices in (1, 4):
        step_fn = training.make_train_step(model, tx, cfg, attack, make_mesh(devices))
        state = training.init_train_state(model, tx, pool.image_shape, seed=0)
        for _ in range(2):
            state, metrics = step_fn(state, batch)
        states.append(state)
    assert len(states[1].params["head"]["kernel"].sharding.device_set) == 4
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
