"""Train state, optimizer and schedule from config, the jitted PGD-AT step, EMA, and the loop."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jax_advprune import parallel
from jax_advprune.attacks import pgd
from jax_advprune.checkpoint import Checkpointer
from jax_advprune.losses import smoothed_cross_entropy
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


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """SGD (Nesterov) with decoupled-from-BN weight decay and a warm-up + cosine schedule per step.

    Reads cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.warmup_steps.
    """
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov),
    )


def ema_decay(step: jax.Array, tau: float, warmup_steps: int = 0) -> jax.Array:
    """The reference's dynamic EMA decay: 0 before warm-up, then min(tau, (1 + d) / (10 + d))."""
    delta = (step - warmup_steps).astype(jnp.float32)
    return jnp.where(step > warmup_steps, jnp.minimum(tau, (1.0 + delta) / (10.0 + delta)), 0.0)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple, seed: int) -> TrainState:
    """Initialises params and BatchNorm statistics from `seed` on a dummy batch of `image_shape`."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
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


def inference_logits_fn(model: nn.Module, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """logits_fn with BatchNorm running averages: samples independent of each other."""
    return lambda x: model.apply(variables, x, train=False)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    attack: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
):
    """PGD-AT step (state, host batch) -> (state, metrics), jitted over the mesh.

    host batch: this process's share of `image` (b, H, W, C) uint8, `label` (b,) int
    and `eps` (b,) float32 per-sample training radius; it becomes a global batch
    split over the mesh's `data` axis, while the state is replicated. The compiler
    partitions the step, so BatchNorm statistics are those of the global batch and
    the update equals the one-device update up to float round-off. The attack's
    step size scales with eps: alpha_i = eps_i * attack.step_size / attack.eps.
    """
    step_ratio = attack.step_size / attack.eps

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        x = batch["image"].astype(jnp.float32) / 255.0
        labels = batch["label"]
        eps = batch["eps"]
        key = jax.random.fold_in(state.rng, state.step)
        x_adv = pgd(
            batch_stat_logits_fn(model, state.variables()), x, labels, key,
            eps=eps, step_size=eps * step_ratio, steps=attack.steps, norm=attack.norm,
        )

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x_adv, train=True, mutable=["batch_stats"]
            )
            loss = jnp.mean(smoothed_cross_entropy(logits, labels, cfg.label_smoothing))
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup_steps)
        ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
        )
        metrics = {
            "loss": loss,
            "adv_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "mean_eps": jnp.mean(eps),
            "grad_norm": optax.tree.norm(grads),
        }
        return new_state, metrics

    jitted = jax.jit(
        train_step,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
    )

    def step(state: TrainState, host_batch: dict) -> tuple[TrainState, dict]:
        return jitted(state, parallel.global_batch({k: host_batch[k] for k in ("image", "label", "eps")}, mesh))

    return step


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


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
) -> TrainState:
    """Runs train_step from state.step to num_steps, checkpointing state and iterator.

    Metrics are averaged over the steps since the last report. The final step is
    always checkpointed; a non-finite loss stops the run without saving over the
    last good checkpoint.
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
                raise NonFiniteLossError(
                    f"loss is {averaged['loss']} at step {step}; the last good checkpoint is step {checkpointer.latest_step()}"
                )
            progress.update(step, force=step == num_steps, **averaged)
        if step % checkpoint_every == 0 or step == num_steps:
            checkpointer.save(step, state, batches)
    checkpointer.wait()
    return state
