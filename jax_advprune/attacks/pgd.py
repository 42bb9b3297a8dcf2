"""Projected gradient descent (Madry et al. 2018) as a pure function of a logits function."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax_advprune.attacks.common import check_norm, per_sample, project, random_in_ball, steepest_ascent
from jax_advprune.attacks.losses import AttackLoss, get_attack_loss

LogitsFn = Callable[[jax.Array], jax.Array]


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps,
    step_size,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss: str | AttackLoss = "ce",
    unroll: int | bool = 1,
) -> jax.Array:
    """Untargeted PGD: maximises `loss(logits_fn(x_adv), y)` inside the eps-ball around x.

    Args:
      logits_fn: maps images (B, H, W, C) float32 in [0, 1] to logits (B, K).
      x: clean images (B, H, W, C), float32 in [0, 1].
      y: the loss target: int labels (B,) for 'ce' / 'margin', clean probabilities
        (B, K) for 'kl'.
      key: PRNG key for the random start.
      eps: attack radius, scalar or per-sample (B,), in the units of `norm`
        (pixel intensity in [0, 1]). A sample with eps 0 stays clean.
      step_size: step length per iteration, scalar or per-sample (B,).
      steps: number of gradient steps (static).
      norm: 'linf' (signed-gradient steps) or 'l2' (normalised-gradient steps).
      random_start: start from a uniform point in the ball instead of x.
      loss: 'ce', 'margin', 'kl' or a callable (logits, y) -> (B,) to maximise.
      unroll: passed to `lax.fori_loop`; unrolling is faster on XLA:CPU at
        the price of compile time.

    Returns:
      x_adv (B, H, W, C) with ||x_adv - x|| <= eps per sample and x_adv in [0, 1].
    """
    check_norm(norm)
    loss_fn = get_attack_loss(loss)
    x = jnp.asarray(x, jnp.float32)
    step_b = per_sample(step_size, x)

    def total_loss(x_adv):
        return jnp.sum(loss_fn(logits_fn(x_adv), y))

    def body(_, x_adv):
        grad = jax.grad(total_loss)(x_adv)
        x_adv = x_adv + step_b * steepest_ascent(grad, norm)
        return jnp.clip(x + project(x_adv - x, eps, norm), 0.0, 1.0)

    x_adv = x
    if random_start:
        x_adv = jnp.clip(x + random_in_ball(key, x, eps, norm), 0.0, 1.0)
    x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)
    return jax.lax.stop_gradient(x_adv)
