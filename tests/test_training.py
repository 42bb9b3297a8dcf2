"""Training: a resumed run equals an uninterrupted one; EMA and weight-decay details."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax_advprune import training
from jax_advprune.attacks import pgd
from jax_advprune.checkpoint import Checkpointer, abstract_like
from jax_advprune.data.loader import BatchReader, batch_iterator, make_plan
from jax_advprune.losses import trades_loss
from jax_advprune.metrics import Progress
from jax_advprune.models import create_model
from jax_advprune.parallel import make_mesh

NUM_STEPS = 6


def _config():
    cfg = ml_collections.ConfigDict(
        dict(
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            warmup_steps=2,
            label_smoothing=0.1,
            ema_decay=0.995,
            ema_warmup_steps=0,
            loss="pgd_at",
            trades_beta=6.0,
        )
    )
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


def _run(setup, pool, ckpt_dir, *, stop_after=None, nan_from=None, nan_state_from=None):
    model, tx, step_fn = setup
    n = len(pool)
    plan = make_plan(
        np.ones(n, bool),
        pool.num_original,
        batch_size=16,
        original_fraction=0.25,
        synthetic_with_replacement=True,
        seed=0,
    )
    reader = BatchReader(pool, plan, np.full(n, 0.1, np.float32), crop_padding=1)
    batches = batch_iterator(reader, NUM_STEPS)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    checkpointer = Checkpointer(str(ckpt_dir), max_to_keep=2)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state), batches)

    def train_step(state, batch):  # dies like a killed run after `stop_after` steps; diverges from `nan_from`
        if stop_after is not None and int(state.step) == stop_after:
            raise Interrupted
        done = int(state.step)
        state, metrics = step_fn(state, batch)
        if nan_from is not None and done >= nan_from:
            metrics = dict(metrics, loss=jnp.asarray(jnp.nan))
        if (
            nan_state_from is not None and done >= nan_state_from
        ):  # parameters diverge while the logged loss stays finite
            state = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
        return state, metrics

    try:
        state = training.fit(
            state,
            train_step,
            batches,
            num_steps=NUM_STEPS,
            checkpointer=checkpointer,
            checkpoint_every=2,
            progress=Progress("t", NUM_STEPS, 16),
            log_every_steps=1,
        )
    finally:
        checkpointer.wait()
        checkpointer.close()
    return state


@pytest.mark.slow
def test_resumed_training_matches_uninterrupted_bitwise(setup, small_pool, tmp_path):
    pool, _, _ = small_pool
    straight = _run(setup, pool, tmp_path / "a")
    with pytest.raises(Interrupted):
        _run(setup, pool, tmp_path / "b", stop_after=3)  # checkpoint at step 2, step 3 lost
    resumed = _run(setup, pool, tmp_path / "b")
    assert int(resumed.step) == int(straight.step) == NUM_STEPS
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(setup, small_pool, tmp_path):
    pool, _, _ = small_pool
    with pytest.raises(
        training.NonFiniteTrainingError,
        match="loss is nan at step 4; the last checkpoint whose state is finite is step 2",
    ):
        _run(setup, pool, tmp_path / "nan", nan_from=3)  # checkpoints every 2 steps; step 4's loss is NaN
    assert os.listdir(tmp_path / "nan") == ["2"]  # nothing saved from the diverged steps


def test_a_non_finite_state_is_never_saved_and_the_error_names_the_last_finite_checkpoint(setup, small_pool, tmp_path):
    pool, _, _ = small_pool
    with pytest.raises(training.NonFiniteTrainingError, match=r"state at step 4: params hold NaN.*finite is step 2"):
        _run(setup, pool, tmp_path / "nan", nan_state_from=3)  # the loss stays finite; the parameters do not
    assert os.listdir(tmp_path / "nan") == ["2"]
    model, tx, _ = setup
    restored = Checkpointer(str(tmp_path / "nan")).restore(
        abstract_like(training.init_train_state(model, tx, pool.image_shape, seed=0))
    )
    assert training.non_finite_parts(restored) == []
    with pytest.raises(training.NonFiniteTrainingError, match="there is no checkpoint of this run with a finite state"):
        _run(setup, pool, tmp_path / "nan_at_once", nan_state_from=0)


def test_training_can_start_from_given_variables(setup):
    model, tx, _ = setup
    given = training.init_train_state(model, tx, (8, 8, 1), seed=5)
    state = training.init_train_state(model, tx, (8, 8, 1), seed=0, initial=given.variables())
    for a, b in zip(
        jax.tree_util.tree_leaves((state.params, state.batch_stats, state.ema_params)),
        jax.tree_util.tree_leaves((given.params, given.batch_stats, given.params)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = create_model("small_cnn", num_classes=10, widths=(8, 32))
    with pytest.raises(ValueError, match="structure and shapes"):
        training.init_train_state(
            wider, training.make_optimizer(_config()[0], 10), (8, 8, 1), seed=0, initial=given.variables()
        )


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


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["pgd_at", "trades"])
def test_three_and_four_devices_give_the_one_device_update(setup, small_pool, loss):
    model, tx, _ = setup
    cfg, attack = _config()
    cfg.loss = loss
    pool, _, _ = small_pool
    plan = make_plan(
        np.ones(len(pool), bool),
        pool.num_original,
        batch_size=24,
        original_fraction=0.25,
        synthetic_with_replacement=True,
        seed=0,
    )
    batch = BatchReader(pool, plan, np.linspace(0, 0.1, len(pool)).astype(np.float32), crop_padding=1)(0)
    states = []
    for devices in (1, 3, 4):
        step_fn = training.make_train_step(model, tx, cfg, attack, make_mesh(devices))
        state = training.init_train_state(model, tx, pool.image_shape, seed=0)
        for _ in range(2):
            state, metrics = step_fn(state, batch)
        states.append(state)
    assert [len(s.params["head"]["kernel"].sharding.device_set) for s in states] == [1, 3, 4]
    for other in states[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_trades_loss_matches_the_reference_formula_in_pytorch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    clean, adv = rng.normal(size=(2, 8, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 8)
    ours = float(
        jnp.mean(trades_loss(jnp.asarray(clean), jnp.asarray(adv), jnp.asarray(labels), beta=5.0, label_smoothing=0.1))
    )
    clean_t, adv_t = torch.tensor(clean), torch.tensor(adv)
    natural = F.cross_entropy(clean_t, torch.tensor(labels), label_smoothing=0.1)
    robust = F.kl_div(F.log_softmax(adv_t, dim=1), F.softmax(clean_t, dim=1), reduction="batchmean")
    assert ours == pytest.approx(float(natural + 5.0 * robust), rel=1e-5)


@pytest.mark.slow
def test_attack_passes_leave_batchnorm_averages_to_the_training_passes(setup, small_pool):
    """After a TRADES step the running averages are exactly those of two training-mode passes
    (clean, then adversarial) from the old statistics: PGD's forward passes did not touch them."""
    model, tx, _ = setup
    cfg, attack = _config()
    cfg.loss = "trades"
    pool, _, _ = small_pool
    plan = make_plan(
        np.ones(len(pool), bool),
        pool.num_original,
        batch_size=16,
        original_fraction=None,
        synthetic_with_replacement=False,
        seed=0,
    )
    batch = BatchReader(pool, plan, np.full(len(pool), 0.1, np.float32))(0)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    _, updates = model.apply(
        state.variables(), jnp.zeros((4,) + pool.image_shape) + 0.3, train=True, mutable=["batch_stats"]
    )
    state = state.replace(batch_stats=updates["batch_stats"])  # non-trivial starting averages
    new_state, _ = training.make_train_step(model, tx, cfg, attack, make_mesh(1))(
        jax.tree_util.tree_map(jnp.copy, state), batch
    )

    x = jnp.asarray(batch["image"], jnp.float32) / 255.0
    logits_fn = training.batch_stat_logits_fn(model, state.variables())
    clean_probs = jax.nn.softmax(logits_fn(x), axis=-1)
    key = jax.random.fold_in(state.rng, state.step)
    eps = jnp.asarray(batch["eps"])
    x_adv = pgd(
        logits_fn,
        x,
        clean_probs,
        key,
        eps=eps,
        step_size=eps * 0.5,
        steps=attack.steps,
        norm="linf",
        loss="kl",
        mesh=None,
    )
    _, after_clean = model.apply(state.variables(), x, train=True, mutable=["batch_stats"])
    _, after_adv = model.apply(
        {"params": state.params, "batch_stats": after_clean["batch_stats"]}, x_adv, train=True, mutable=["batch_stats"]
    )
    for got, want in zip(
        jax.tree_util.tree_leaves(new_state.batch_stats), jax.tree_util.tree_leaves(after_adv["batch_stats"])
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(small_pool):
    cfg, attack = _config()
    pool, _, _ = small_pool
    plan = make_plan(
        np.ones(len(pool), bool),
        pool.num_original,
        batch_size=16,
        original_fraction=None,
        synthetic_with_replacement=False,
        seed=0,
    )
    batch = BatchReader(pool, plan, np.full(len(pool), 0.1, np.float32))(0)
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = create_model("small_cnn", num_classes=10, widths=(8, 16), dtype=dtype)
        tx = training.make_optimizer(cfg, NUM_STEPS)
        state = training.init_train_state(model, tx, pool.image_shape, seed=0)
        state, metrics = training.make_train_step(model, tx, cfg, attack, make_mesh(2))(state, batch)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.params))
        assert model.apply(state.variables(), jnp.zeros((2,) + pool.image_shape)).dtype == jnp.float32
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses[jnp.bfloat16]) and losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=0.05)


def test_best_checkpointer_keeps_the_highest_metric_across_restarts(tmp_path):
    saves = [(1, 0.3), (2, 0.5), (3, 0.4)]
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=1, best_metric="pgd_accuracy")
    for step, accuracy in saves:
        checkpointer.save(step, {"w": jnp.full(3, float(step))}, metrics={"pgd_accuracy": accuracy})
    checkpointer.wait()
    checkpointer.close()
    reopened = Checkpointer(str(tmp_path), max_to_keep=1, best_metric="pgd_accuracy")
    assert reopened.best_step() == 2
    reopened.save(4, {"w": jnp.full(3, 4.0)}, metrics={"pgd_accuracy": 0.45})  # worse: dropped
    reopened.wait()
    assert reopened.best_step() == 2 and os.listdir(tmp_path) == ["2"]
    np.testing.assert_array_equal(
        reopened.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})["w"], np.full(3, 2.0)
    )
    reopened.close()


def _fit_with_validation(setup, pool, ckpt_dir, accuracies: dict, *, patience: int, min_steps: int = 0):
    """fit over NUM_STEPS steps validated every step with scripted robust accuracies {step: accuracy}."""
    model, tx, step_fn = setup
    n = len(pool)
    plan = make_plan(
        np.ones(n, bool),
        pool.num_original,
        batch_size=16,
        original_fraction=None,
        synthetic_with_replacement=False,
        seed=0,
    )
    batches = batch_iterator(BatchReader(pool, plan, np.full(n, 0.1, np.float32)), NUM_STEPS)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    checkpointer = Checkpointer(str(ckpt_dir), max_to_keep=2)
    validated = []

    def evaluate(variables):
        validated.append(len(validated) + 1)
        return {"pgd_accuracy": accuracies[len(validated)]}

    validation = training.Validation(
        evaluate=evaluate,
        every=1,
        checkpointer=Checkpointer(str(ckpt_dir) + "_best", 1, "pgd_accuracy"),
        patience=patience,
        min_steps=min_steps,
    )
    try:
        state = training.fit(
            state,
            step_fn,
            batches,
            num_steps=NUM_STEPS,
            checkpointer=checkpointer,
            checkpoint_every=4,
            progress=Progress("t", NUM_STEPS, 16),
            log_every_steps=1,
            validation=validation,
        )
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return int(state.step), latest, validation


def test_early_stopping_ends_after_patience_validations_without_a_better_one(setup, small_pool, tmp_path):
    """The reference's rule: stop at the first validation more than `patience` validations after the best one."""
    pool, _, _ = small_pool
    accuracies = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.2, 5: 0.25, 6: 0.5}  # best at step 2
    step, latest, validation = _fit_with_validation(setup, pool, tmp_path / "stop", accuracies, patience=2)
    assert step == latest == 5  # 5 - 2 > 2 validations: stopped and saved there, though checkpoint_every is 4
    assert validation.checkpointer.best_step() == 2
    reopened = training.Validation(
        evaluate=None, every=1, checkpointer=Checkpointer(str(tmp_path / "stop_best"), 1, "pgd_accuracy"), patience=2
    )
    assert reopened.stops(5) and not reopened.stops(4)  # a resumed run reads the same decision from the saved metrics
    reopened.checkpointer.close()
    validation.checkpointer.close()
    step, _, validation = _fit_with_validation(setup, pool, tmp_path / "late", accuracies, patience=2, min_steps=6)
    assert step == NUM_STEPS and validation.checkpointer.best_step() == 6  # min_steps: no stop before step 6
    validation.checkpointer.close()
    step, _, validation = _fit_with_validation(setup, pool, tmp_path / "never", accuracies, patience=0)
    assert step == NUM_STEPS
    validation.checkpointer.close()
