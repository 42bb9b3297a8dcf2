"""DM-Improves-AT's optimiser pieces against PyTorch: OneCycleLR per epoch with cycled momentum (the learning rate
and momentum sequences, and SGD's updates on a toy problem), its EMA decay rule, and its CWLoss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jax_advprune import training
from jax_advprune.attacks.objectives import cw_loss

torch = pytest.importorskip("torch")


def _onecycle_config(lr=0.2, pct_start=0.025, nesterov=True, weight_decay=0.0):
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            momentum=0.9,
            nesterov=nesterov,
            weight_decay=weight_decay,
            warmup_steps=0,
            schedule="onecycle",
            onecycle_pct_start=pct_start,
        )
    )


def _torch_onecycle(lr, epochs, pct_start, nesterov=True, weight_decay=0.0, params=None):
    params = params if params is not None else [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    # DM-Improves-AT's 'cosinew': OneCycleLR(max_lr=lr, pct_start=0.025, total_steps=epochs), stepped per epoch.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, pct_start=pct_start, total_steps=epochs)
    return opt, sched


@pytest.mark.parametrize("epochs,pct_start", [(400, 0.025), (40, 0.25), (7, 0.3), (2, 0.025)])
def test_the_onecycle_schedule_is_torch_s_onecyclelr_stepped_per_epoch(epochs, pct_start):
    steps_per_epoch = 3
    cfg = _onecycle_config(pct_start=pct_start)
    total = epochs * steps_per_epoch
    lr = training.make_schedule(cfg, total, steps_per_epoch)
    momentum = training.make_momentum_schedule(cfg, total, steps_per_epoch)
    opt, sched = _torch_onecycle(cfg.lr, epochs, pct_start)
    ours_lr, ours_m, theirs_lr, theirs_m = [], [], [], []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):  # constant within the epoch
            ours_lr.append(float(lr(epoch * steps_per_epoch + i)))
            ours_m.append(float(momentum(epoch * steps_per_epoch + i)))
            theirs_lr.append(opt.param_groups[0]["lr"])
            theirs_m.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours_lr, theirs_lr, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(ours_m, theirs_m, rtol=1e-6)
    if epochs == 400:  # the reference's numbers: lr/25 first, the peak at epoch 9, lr/25/1e4 last; momentum 0.95/0.85
        assert ours_lr[0] == pytest.approx(0.2 / 25) and ours_lr[9 * 3] == pytest.approx(0.2)
        assert ours_lr[-1] == pytest.approx(0.2 / 25 / 1e4, rel=1e-3)
        assert ours_m[0] == pytest.approx(0.95) and ours_m[9 * 3] == pytest.approx(0.85)


def test_the_onecycle_optimiser_takes_torch_sgd_s_steps():
    """Nesterov SGD with weight decay and the cycled momentum on a least-squares problem: the same parameters as
    torch.optim.SGD under OneCycleLR after every step (weight decay on the 'kernel' only, as both sides are set)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    epochs, steps_per_epoch = 8, 4
    cfg = _onecycle_config(lr=0.05, pct_start=0.25, weight_decay=5e-3)
    tx = training.make_optimizer(cfg, epochs * steps_per_epoch, steps_per_epoch)
    params = {"kernel": jnp.zeros(5), "bias": jnp.zeros(())}
    loss = lambda p: jnp.mean((jnp.asarray(a) @ p["kernel"] + p["bias"] - b) ** 2)  # noqa: E731
    state = tx.init(params)
    kernel, bias = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD(
        [{"params": [kernel]}, {"params": [bias], "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, pct_start=0.25, total_steps=epochs)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
            opt.zero_grad()
            torch.mean((torch.tensor(a) @ kernel + bias - torch.tensor(b)) ** 2).backward()
            opt.step()
            np.testing.assert_allclose(params["kernel"], kernel.detach().numpy(), rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(params["bias"], bias.detach().numpy(), rtol=2e-5, atol=1e-6)
        sched.step()


def test_the_reference_ema_rule_is_watrain_s_ema_update():
    """watrain.py's ema_update(global_step = k after the k-th update, warmup_steps = w, dynamic decay) written out
    in Python, against ours after the same updates; ema_start is 0.025 x total steps."""

    def theirs(k, w, tau=0.995):
        factor = int(k >= w)
        delta = k - w
        decay = min(tau, (1.0 + delta) / (10.0 + delta)) if 10.0 + delta != 0 else tau
        return decay * factor

    cfg = ml_collections.ConfigDict(dict(ema_start_fraction=0.025, ema_warmup_steps=0))
    start = training.ema_start(cfg, 400 * 98)
    assert start == pytest.approx(980.0)
    steps = np.array([0, 1, 978, 979, 980, 981, 1000, 39_199])
    ours = np.asarray(training.reference_ema_decay(jnp.asarray(steps), 0.995, start))
    np.testing.assert_allclose(ours, [theirs(s + 1, 980.0) for s in steps], rtol=1e-6)
    assert ours[3] == pytest.approx(0.1) and ours[2] == 0.0  # update 980 is the first average, at 1/10
    assert training.ema_start(ml_collections.ConfigDict(dict(ema_start_fraction=0.0)), 1000) is None


def test_cw_loss_is_the_reference_cwloss():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 64)
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 10).float()
    out = torch.tensor(logits)
    real = (onehot * out).sum(1)
    other = ((1.0 - onehot) * out - onehot * 10000.0).max(1)[0]
    theirs = -torch.clamp(real - other, min=0.0)  # CWLoss, per sample (it sums them)
    np.testing.assert_allclose(cw_loss(jnp.asarray(logits), jnp.asarray(labels)), theirs.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_first_step_batch_statistics_are_those_of_a_momentum_one_first_update(small_pool, monkeypatch):
    """train.first_step_batch_stats: after a TRADES step 0 the BatchNorm averages equal those of the same step with
    the layers' momentum set to 1.0 in PyTorch's terms (0 in Flax's: the batch statistics of the last pass); the
    parameters are untouched by it, and from step 1 on the step is the usual one."""
    from test_training import _config

    from jax_advprune.data.loader import BatchReader, make_plan
    from jax_advprune.models import create_model, small_cnn
    from jax_advprune.parallel import make_mesh

    cfg, attack = _config()
    cfg.loss, cfg.first_step_batch_stats = "trades", True
    pool, _, _ = small_pool
    plan = make_plan(np.ones(len(pool), bool), pool.num_original, batch_size=16, original_fraction=None,
                     synthetic_with_replacement=False, seed=0)  # fmt: skip
    reader = BatchReader(pool, plan, np.full(len(pool), 0.1, np.float32))
    model = create_model("small_cnn", num_classes=10, widths=(8, 16))
    tx = training.make_optimizer(cfg, 4)
    fresh = lambda: training.init_train_state(model, tx, pool.image_shape, seed=0)  # noqa: E731
    with_option = training.make_train_step(model, tx, cfg, attack, make_mesh(1))
    usual_cfg = ml_collections.ConfigDict(dict(cfg.to_dict(), first_step_batch_stats=False))
    usual = training.make_train_step(model, tx, usual_cfg, attack, make_mesh(1))
    first, _ = with_option(fresh(), reader(0))
    first = jax.device_get(first)
    plain_first, _ = usual(fresh(), reader(0))
    monkeypatch.setattr(small_cnn, "BN_MOMENTUM", 0.0)  # read when the step is traced: a new step function
    reference, _ = training.make_train_step(model, tx, usual_cfg, attack, make_mesh(1))(fresh(), reader(0))
    monkeypatch.undo()
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), first.batch_stats,
                           reference.batch_stats)  # fmt: skip
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, plain_first.params)
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                                             first.batch_stats, plain_first.batch_stats))  # fmt: skip
    assert max(moved) > 1e-3  # the option changed the averages
    copy = lambda state: jax.tree_util.tree_map(jnp.copy, state)  # noqa: E731  (the step donates its state)
    second, _ = with_option(copy(first), reader(1))
    second_usual, _ = usual(copy(first), reader(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, second.batch_stats, second_usual.batch_stats)
    jax.tree_util.tree_map(np.testing.assert_array_equal, second.params, second_usual.params)
