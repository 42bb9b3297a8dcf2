"""Projected gradient descent (Madry et al. 2018) as a pure function of a logits function."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_advprune import backends
from jax_advprune.attacks.common import check_norm, per_sample, project, random_in_ball, steepest_ascent
from jax_advprune.attacks.dispatch import AUTO, run_attack
from jax_advprune.attacks.objectives import AttackLoss, get_attack_loss

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
    targeted: bool = False,
    restarts: int = 1,
    unroll: int | bool | None = None,
    mesh=AUTO,
) -> jax.Array:
    """PGD: maximises `loss(logits_fn(x_adv), y)` (minimises it when targeted) in the eps-ball around x.

    Args:
      logits_fn: maps images (B, H, W, C) float32 in [0, 1] to logits (B, K).
      x: clean images (B, H, W, C), float32 in [0, 1].
      y: the loss target: int labels (B,) for 'ce' / 'cw_margin', clean probabilities
        (B, K) for 'kl'.
      key: PRNG key for the random start.
      eps: attack radius, scalar or per-sample (B,), in the units of `norm`
        (pixel intensity in [0, 1]). A sample with eps 0 stays clean.
      step_size: step length per iteration, scalar or per-sample (B,).
      steps: number of gradient steps (static).
      norm: 'linf' (signed-gradient steps) or 'l2' (normalised-gradient steps).
      random_start: start from a uniform point in the ball instead of x.
      loss: 'ce', 'cw_margin', 'kl' or a callable (logits, y) -> (B,) to maximise.
      targeted: `y` holds target classes and the loss is minimised instead.
      restarts: independent random starts (static); each sample keeps its worst
        case: a successful point first (misclassified, or classified as the
        target), then the highest objective.
      unroll: passed to `lax.fori_loop`. None: `backends.unroll_loops()`, fully
        unrolled on the CPU (XLA:CPU runs it much faster than a loop body, at the
        price of compile time; pass 1 for long attacks there) and a loop body on
        accelerators (as fast, and it compiles in a fraction of the time).
      mesh: devices to split the batch over: 'auto' (every local device when there
        are several), a `jax.sharding.Mesh` with a 'data' axis, or None. Called
        inside a trace, the attack is inlined and `mesh` is ignored.

    Compiled once per `logits_fn` object, settings and shapes (see
    `attacks.dispatch`); pass `jax.tree_util.Partial(apply, params)` to keep the
    weights out of the compiled program.

    Returns:
      x_adv (B, H, W, C) with ||x_adv - x|| <= eps per sample and x_adv in [0, 1].
    """
    check_norm(norm)
    unroll = backends.unroll_loops() if unroll is None else unroll
    return run_attack(
        _pgd,
        logits_fn,
        x,
        y,
        key,
        dynamic=dict(eps=eps, step_size=step_size),
        mesh=mesh,
        static=dict(
            steps=steps,
            norm=norm,
            random_start=random_start,
            loss=loss,
            targeted=targeted,
            restarts=restarts,
            unroll=unroll,
        ),
    )


def _pgd(logits_fn, x, y, key, *, eps, step_size, steps, norm, random_start, loss, targeted, restarts, unroll):
    """The traceable PGD of `pgd` (same arguments)."""
    loss_fn = get_attack_loss(loss)
    sign = -1.0 if targeted else 1.0
    x = jnp.asarray(x, jnp.float32)
    step_b = per_sample(step_size, x)

    def objective(x_adv):
        return sign * loss_fn(logits_fn(x_adv), y)

    def body(_, x_adv):
        grad = jax.grad(lambda z: jnp.sum(objective(z)))(x_adv)
        x_adv = x_adv + step_b * steepest_ascent(grad, norm)
        return jnp.clip(x + project(x_adv - x, eps, norm), 0.0, 1.0)

    def one_run(run_key):
        x_adv = x
        if random_start:
            x_adv = jnp.clip(x + random_in_ball(run_key, x, eps, norm), 0.0, 1.0)
        return jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)

    if restarts <= 1:
        return jax.lax.stop_gradient(one_run(key))

    def worst_case_score(x_adv):
        logits = logits_fn(x_adv)
        value = sign * loss_fn(logits, y)
        if y.ndim != 1:  # soft targets (KL): no notion of success
            return value
        hit = jnp.argmax(logits, axis=-1) == y
        success = hit if targeted else ~hit
        return jnp.where(success, jnp.inf, value)

    def restart(i, carry):
        best_x, best_score = carry
        candidate = one_run(jax.random.fold_in(key, i))
        score = worst_case_score(candidate)
        better = score > best_score
        return jnp.where(per_sample(better, candidate), candidate, best_x), jnp.where(better, score, best_score)

    first = one_run(jax.random.fold_in(key, 0))
    best_x, _ = jax.lax.fori_loop(1, restarts, restart, (first, worst_case_score(first)))
    return jax.lax.stop_gradient(best_x)
