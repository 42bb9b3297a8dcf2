"""Train state, optimizer and schedule from config, the jitted PGD-AT step, EMA, and the loop."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jax_advprune import parallel, preemption
from jax_advprune.attacks import pgd
from jax_advprune.attacks.common import to_unit_interval
from jax_advprune.checkpoint import Checkpointer
from jax_advprune.errors import UserError
from jax_advprune.losses import smoothed_cross_entropy, trades_loss
from jax_advprune.metrics import Progress


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs besides the data-iterator state.

    step: () int32, optimizer steps taken. params / batch_stats: Flax variables.
    opt_state: optax state. ema_params: exponential moving average of params.
    rng: (2,) uint32 base key; per-step keys are folded from it by step.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array

    def variables(self, ema: bool = False) -> dict:
        """Flax variables for `model.apply`, with the EMA weights when `ema`."""
        return {"params": self.ema_params if ema else self.params, "batch_stats": self.batch_stats}


def decay_mask(params) -> Any:
    """True for convolution and dense kernels; False for biases and BatchNorm scales/offsets."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


SCHEDULES = ("warmup_cosine", "onecycle")
# torch.optim.lr_scheduler.OneCycleLR's defaults, as DM-Improves-AT's 'cosinew' scheduler uses them.
ONECYCLE_DIV_FACTOR = 25.0  # the first learning rate is lr / 25
ONECYCLE_FINAL_DIV_FACTOR = 1e4  # the last is lr / 25 / 1e4
ONECYCLE_MOMENTUM = (0.85, 0.95)  # (base, max): max -> base over the warm-up, base -> max after


def onecycle_value(epoch, epochs: int, pct_start: float, start: float, peak: float, end: float):
    """torch's OneCycleLR (two phases, cosine annealing) at scheduler step `epoch` of `epochs`: cosine from `start`
    to `peak` until step pct_start * epochs - 1, then cosine from `peak` to `end` at step epochs - 1."""
    warmup_end = float(pct_start * epochs) - 1.0
    last = float(epochs - 1)
    epoch = jnp.asarray(epoch, jnp.float32)

    def cosine(a, b, fraction):  # b + (a - b) (cos(pi f) + 1) / 2, written without float32's cancellation near f = 1
        return b + (a - b) * jnp.cos(jnp.pi / 2 * fraction) ** 2

    rising = cosine(start, peak, epoch / warmup_end) if warmup_end > 0 else peak
    falling = cosine(peak, end, (epoch - warmup_end) / max(last - warmup_end, 1e-12))
    return jnp.where(epoch <= warmup_end, rising, falling)


def _epochs_of(total_steps: int, steps_per_epoch: int) -> int:
    return max(1, -(-int(total_steps) // max(1, int(steps_per_epoch))))


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int = 1) -> optax.Schedule:
    """Learning rate per optimizer step.

    cfg.schedule 'warmup_cosine': linear warm-up over cfg.warmup_steps to cfg.lr, then cosine to 0, per step.
    'onecycle' (DM-Improves-AT's 'cosinew'): torch's OneCycleLR over the run's epochs (ceil(total_steps /
    steps_per_epoch)) with pct_start cfg.onecycle_pct_start, stepped once per epoch: cosine from lr / 25 up to lr,
    then cosine down to lr / 25 / 1e4; constant within an epoch."""
    if cfg.get("schedule", "warmup_cosine") == "onecycle":
        epochs, pct = _epochs_of(total_steps, steps_per_epoch), float(cfg.onecycle_pct_start)
        start = cfg.lr / ONECYCLE_DIV_FACTOR
        end = start / ONECYCLE_FINAL_DIV_FACTOR
        return lambda step: onecycle_value(step // steps_per_epoch, epochs, pct, start, cfg.lr, end)
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_momentum_schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int = 1):
    """SGD momentum per optimizer step for cfg.schedule 'onecycle' (OneCycleLR's cycle_momentum: 0.95 down to 0.85
    over the warm-up, back up to 0.95 at the end, per epoch), else the constant cfg.momentum."""
    if cfg.get("schedule", "warmup_cosine") != "onecycle":
        return cfg.momentum
    epochs, pct = _epochs_of(total_steps, steps_per_epoch), float(cfg.onecycle_pct_start)
    base, peak = ONECYCLE_MOMENTUM
    return lambda step: onecycle_value(step // steps_per_epoch, epochs, pct, peak, base, peak)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """SGD (Nesterov) with weight decay on kernels only (not BatchNorm, not biases), `make_schedule` per step.

    Reads cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.warmup_steps, cfg.schedule (and
    cfg.onecycle_pct_start). With 'onecycle' the momentum follows `make_momentum_schedule` too (optax's
    inject_hyperparams; the update is torch.optim.SGD's: buffer = momentum * buffer + grad, Nesterov step grad +
    momentum * buffer)."""
    schedule = make_schedule(cfg, total_steps, steps_per_epoch)
    if cfg.get("schedule", "warmup_cosine") == "onecycle":
        sgd = optax.inject_hyperparams(optax.sgd)(
            learning_rate=schedule,
            momentum=make_momentum_schedule(cfg, total_steps, steps_per_epoch),
            nesterov=cfg.nesterov,
        )
    else:
        sgd = optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), sgd)


def ema_start(cfg: ml_collections.ConfigDict, total_steps: int) -> float | None:
    """DM-Improves-AT's EMA start, cfg.ema_start_fraction x total_steps (its warmup_steps = 0.025 x epochs x steps
    per epoch), or None when the fraction is 0 (the train step then uses cfg.ema_warmup_steps and `ema_decay`)."""
    fraction = float(cfg.get("ema_start_fraction", 0.0))
    return fraction * total_steps if fraction > 0 else None


def ema_decay(step: jax.Array, tau: float, warmup_steps: int = 0) -> jax.Array:
    """The EMA decay after step `step` (counted from 0): 0 until step warmup_steps, then min(tau, (1 + d) / (10 + d)),
    d = step - warmup_steps."""
    delta = (step - warmup_steps).astype(jnp.float32)
    return jnp.where(step > warmup_steps, jnp.minimum(tau, (1.0 + delta) / (10.0 + delta)), 0.0)


def reference_ema_decay(step: jax.Array, tau: float, start: float) -> jax.Array:
    """DM-Improves-AT's `ema_update` decay (watrain.py) after update k = step + 1, counting updates from 1: 0 while
    k < start, then min(tau, (1 + d) / (10 + d)), d = k - start. With start = s + 1 this is `ema_decay` with
    warmup_steps s except at update k = start, where it is 0.1 instead of 0."""
    k = (step + 1).astype(jnp.float32)
    delta = k - start
    return jnp.where(k >= start, jnp.minimum(tau, (1.0 + delta) / (10.0 + delta)), 0.0)


def init_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple, seed: int, initial: dict | None = None
) -> TrainState:
    """Initialises params and BatchNorm statistics from `seed` on a dummy batch of `image_shape`, or takes them
    from `initial` ({'params', 'batch_stats'}, checked to have the model's structure and shapes); the optimizer
    state is fresh and the EMA starts at the parameters."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    if initial is not None:
        expected = jax.tree_util.tree_map(
            lambda a: (a.shape, a.dtype), {k: variables.get(k, {}) for k in ("params", "batch_stats")}
        )
        given = jax.tree_util.tree_map(
            lambda a: (jnp.shape(a), jnp.asarray(a).dtype), {k: initial.get(k, {}) for k in ("params", "batch_stats")}
        )
        if given != expected:
            raise ValueError("initial variables do not have the model's structure and shapes")
        variables = jax.tree_util.tree_map(jnp.asarray, {k: initial[k] for k in ("params", "batch_stats")})
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),  # distinct buffers: the step donates both
        rng=train_key,
    )


def batch_stat_logits_fn(model: nn.Module, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """logits_fn for training-time attacks: batch statistics, running averages not updated."""

    def logits_fn(x):
        logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits

    return logits_fn


TRAINING_LOSSES = ("pgd_at", "trades")


def _adversarial_examples(
    attack_logits_fn, x, labels, eps, key, attack: ml_collections.ConfigDict, trades: bool
) -> jax.Array:
    """The training attack's inputs: PGD on KL(clean || adv) for TRADES, on cross-entropy for PGD-AT.

    eps (B,) per sample; the step scales with it: alpha_i = eps_i * attack.step_size / attack.eps.
    """
    step_size = eps * (attack.step_size / attack.eps)
    if trades:
        clean_probs = jax.lax.stop_gradient(jax.nn.softmax(attack_logits_fn(x), axis=-1))
        return pgd(
            attack_logits_fn,
            x,
            clean_probs,
            key,
            eps=eps,
            step_size=step_size,
            steps=attack.steps,
            norm=attack.norm,
            loss="kl",
        )
    return pgd(attack_logits_fn, x, labels, key, eps=eps, step_size=step_size, steps=attack.steps, norm=attack.norm)


def _training_loss(model, cfg, trades: bool, batch_stats, x, x_adv, labels, attack_logits_fn, params, fresh=False):
    """Mean training loss of the batch -> (loss, (adversarial logits, clean logits, updated BatchNorm statistics)).

    TRADES: CE_s(clean) + beta * KL, the clean pass first (it updates the BatchNorm
    averages before the adversarial pass, as PyTorch does). PGD-AT: CE_s(adversarial).
    `fresh` (a traced bool): every pass starts its averages from zero, so that the
    returned statistics are (1 - momentum) x the last pass's batch statistics (see
    `make_train_step`, cfg.first_step_batch_stats).
    """

    def zeroed(stats):
        if fresh is False:  # the usual step: nothing added to the program
            return stats
        return jax.tree_util.tree_map(lambda a: jnp.where(fresh, jnp.zeros_like(a), a), stats)

    variables = {"params": params, "batch_stats": zeroed(batch_stats)}
    if trades:
        clean_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {"params": params, "batch_stats": zeroed(updates["batch_stats"])}
    logits, updates = model.apply(variables, x_adv, train=True, mutable=["batch_stats"])
    if trades:
        loss = jnp.mean(trades_loss(clean_logits, logits, labels, cfg.trades_beta, cfg.label_smoothing))
    else:
        clean_logits = jax.lax.stop_gradient(attack_logits_fn(x))  # for the clean-accuracy metric only
        loss = jnp.mean(smoothed_cross_entropy(logits, labels, cfg.label_smoothing))
    return loss, (logits, clean_logits, updates["batch_stats"])


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    attack: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    schedule: optax.Schedule | None = None,
    ema_from: float | None = None,
):
    """Adversarial training step (state, host batch) -> (state, metrics), jitted over the mesh.

    cfg.loss 'pgd_at' (Madry): PGD on cross-entropy, then label-smoothed
    cross-entropy of the adversarial logits. 'trades' (Zhang et al., the
    reference's `trades_loss`): PGD on KL(p_clean || p_adv), then
    CE_smoothed(clean) + cfg.trades_beta * KL(softmax(clean) || softmax(adv)),
    with gradients through both logits.

    EMA: `ema_decay` with cfg.ema_warmup_steps, or with `ema_from` (see `ema_start`) DM-Improves-AT's
    `reference_ema_decay`.

    BatchNorm: the attack's forward passes use batch statistics and leave the
    running averages alone; the training forward passes (clean then adversarial
    for TRADES) update them, in that order, as PyTorch does.
    With cfg.first_step_batch_stats (DM-Improves-AT's `set_bn_momentum(model, 1.0)`
    on its first update, watrain.py) the averages after step 0 are the batch
    statistics of the last training pass (the adversarial one), not a 1 - momentum
    blend with their initial values: that step's passes start from zero averages
    and the result is divided by 1 - model.bn_momentum.

    host batch: this process's share of `image` (b, H, W, C) uint8, `label` (b,) int
    and `eps` (b,) float32 per-sample training radius; it becomes a global batch
    split over the mesh's `data` axis, while the state is replicated. The compiler
    partitions the step, so BatchNorm statistics are those of the global batch and
    the update equals the one-device update up to float round-off. The attack's
    step size scales with eps: alpha_i = eps_i * attack.step_size / attack.eps.
    """
    if cfg.loss not in TRAINING_LOSSES:
        raise ValueError(f"train.loss must be one of {TRAINING_LOSSES}, got {cfg.loss!r}")
    trades = cfg.loss == "trades"
    first_step_stats = bool(cfg.get("first_step_batch_stats", False))
    if first_step_stats and not isinstance(getattr(model, "bn_momentum", None), float):
        raise ValueError(
            "train.first_step_batch_stats needs a model that states its BatchNorm momentum (a `bn_momentum` class "
            f"attribute, as the project's models have); {type(model).__name__} has none"
        )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        x, labels, eps = to_unit_interval(batch["image"]), batch["label"], batch["eps"]
        attack_logits_fn = batch_stat_logits_fn(model, state.variables())
        x_adv = _adversarial_examples(
            attack_logits_fn, x, labels, eps, jax.random.fold_in(state.rng, state.step), attack, trades
        )
        first = (state.step == 0) if first_step_stats else False
        loss_fn = functools.partial(
            _training_loss, model, cfg, trades, state.batch_stats, x, x_adv, labels, attack_logits_fn, fresh=first
        )
        (loss, (logits, clean_logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if first_step_stats:
            batch_stats = jax.tree_util.tree_map(
                lambda a: jnp.where(first, a / (1.0 - model.bn_momentum), a), batch_stats
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = (
            ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup_steps)
            if ema_from is None
            else reference_ema_decay(state.step, cfg.ema_decay, ema_from)
        )
        ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
        )
        metrics = {
            "loss": loss,
            "clean_accuracy": jnp.mean(jnp.argmax(clean_logits, -1) == labels),
            "adv_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "mean_eps": jnp.mean(eps),
            "grad_norm": optax.tree.norm(grads),
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    jitted = jax.jit(
        train_step,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
    )

    replicated = parallel.replicated(mesh)

    def step(state: TrainState, host_batch: dict) -> tuple[TrainState, dict]:
        # A state straight from init or restore is not yet placed like the step's outputs;
        # placing it first keeps the second call from compiling the step again.
        if getattr(state.step, "sharding", None) != replicated:  # device_put places every leaf alike
            state = jax.device_put(state, replicated)
        return jitted(state, parallel.global_batch({k: host_batch[k] for k in ("image", "label", "eps")}, mesh))

    step.jitted = jitted  # (state, global batch) -> (state, metrics): what `plan` compiles for other machines
    return step


class NonFiniteTrainingError(UserError):
    """The training loss or the train state became NaN or Inf (a learning rate too high, most often)."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def non_finite_parts(state: TrainState) -> list[str]:
    """Which of params, EMA params, BatchNorm statistics and optimizer state hold a NaN or Inf ([] when none)."""
    parts = {
        "params": state.params,
        "ema_params": state.ema_params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    return [name for name, tree in parts.items() if not bool(_all_finite(tree))]


def _last_finite_checkpoint(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    if step is None:
        return "there is no checkpoint of this run with a finite state"
    return f"the last checkpoint whose state is finite is step {step} in {checkpointer.directory} (every save is checked first)"


def check_finite(state: TrainState, what: str, checkpointer: Checkpointer) -> None:
    """Raises NonFiniteTrainingError naming the non-finite parts of `state` and the last finite checkpoint."""
    bad = non_finite_parts(state)
    if bad:
        raise NonFiniteTrainingError(
            f"{what}: {', '.join(bad)} hold NaN or Inf, so it is not saved; {_last_finite_checkpoint(checkpointer)}. "
            "Fix: lower train.lr (or raise train.warmup_steps) and rerun in a new --workdir."
        )


@dataclasses.dataclass
class Validation:
    """Model selection during training: robust accuracy on a held-out slice, the best checkpoint kept.

    evaluate: variables -> metrics dict holding `metric` (e.g. PGD accuracy).
    every: validate every this many steps, and after the last step.
    checkpointer: a Checkpointer with best_metric=`metric` (keeps the best save).
    use_ema: validate the EMA weights (what is reported) instead of the raw ones.
    """

    evaluate: Callable[[dict], dict]
    every: int
    checkpointer: Checkpointer
    metric: str = "pgd_accuracy"
    use_ema: bool = True
    patience: int = 0
    min_steps: int = 0

    def __call__(self, state: TrainState, step: int, progress: Progress) -> None:
        metrics = self.evaluate(state.variables(ema=self.use_ema))
        progress.log(step, **{f"val_{k}": v for k, v in metrics.items()})
        self.checkpointer.save(
            step, state, metrics={k: float(v) for k, v in metrics.items()}
        )  # the caller checked it finite

    def stops(self, step: int) -> bool:
        """Early stopping, as the reference's `--early-stop-diff`: True at a validation step (a multiple of `every`,
        at least `min_steps`) that comes more than `patience` validations after the best one (of equal ones, the
        latest: orbax's choice, also the kept checkpoint's). Never with patience 0.

        Read from the best checkpointer's saved metrics, so a resumed run decides as the uninterrupted one."""
        if not self.patience or step < max(self.min_steps, 1) or step % self.every:
            return False
        self.checkpointer.wait()
        best = self.checkpointer.best_step()
        return best is not None and step - best > self.patience * self.every


def fit(
    state: TrainState,
    train_step,
    batches: Iterator[dict],
    *,
    num_steps: int,
    checkpointer: Checkpointer,
    checkpoint_every: int,
    progress: Progress,
    log_every_steps: int = 50,
    validation: Validation | None = None,
    callbacks: tuple[Callable[[TrainState, int], None], ...] = (),
) -> TrainState:
    """Runs train_step from state.step to num_steps, checkpointing state and iterator.

    Metrics are averaged over the steps since the last report. The final step is
    always checkpointed (and validated, with `validation`). Before every save the
    state is checked finite; a non-finite loss or state stops the run
    (NonFiniteTrainingError) without saving, naming the last finite checkpoint.
    Each callback is called as callback(state, step) after every step (the
    training-history recorder). After every step `preemption.stop_requested()` is
    asked; on a SIGTERM the state and iterator are saved at that step and
    `preemption.Preempted` is raised, the same step on every process. When
    `validation.stops(step)` (early stopping) the state is saved and returned
    at that step, before num_steps.
    """
    step = int(state.step)
    pending: list[dict] = []
    while step < num_steps:
        batch = next(batches)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        step += 1
        if step % log_every_steps == 0 or step == num_steps or step % checkpoint_every == 0:
            averaged = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            pending = []
            if not math.isfinite(averaged["loss"]):
                raise NonFiniteTrainingError(
                    f"the training loss is {averaged['loss']} at step {step}; {_last_finite_checkpoint(checkpointer)}. "
                    "Fix: lower train.lr (or raise train.warmup_steps) and rerun in a new --workdir."
                )
            progress.update(step, force=step == num_steps, **averaged)
        stop = preemption.stop_requested()  # the same step on every process
        save = step % checkpoint_every == 0 or step == num_steps or stop
        validate = validation is not None and (step % validation.every == 0 or step == num_steps)
        if save or validate:
            check_finite(state, f"the train state at step {step}", checkpointer)
        if save:
            checkpointer.save(step, state, batches)
        if validate:
            validation(state, step, progress)
        for callback in callbacks:
            callback(state, step)
        if validate and validation.stops(step):
            if not save:
                checkpointer.save(step, state, batches)
            progress.log(step, early_stop_best_step=validation.checkpointer.best_step())
            break
        if stop:
            checkpointer.wait()
            raise preemption.Preempted(
                f"preempted (SIGTERM): saved step {step} of {num_steps} in {checkpointer.directory}; "
                "rerun the same command to resume from there"
            )
    checkpointer.wait()
    if validation is not None:
        validation.checkpointer.wait()
    return state
