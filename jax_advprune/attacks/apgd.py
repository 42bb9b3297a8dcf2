"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...").

Auto-PGD with momentum 0.75 and a step size that starts at 2 eps and is halved
at checkpoints where progress stalled, restarting from the best point. The
checkpoint schedule follows the reference package `autoattack`: the first
checkpoint after int(0.22 N) iterations, later intervals shrinking by 0.03 N
down to 0.06 N. At a checkpoint a sample's step is halved when the loss went up
in at most 75% of the iterations since the last checkpoint, or when its step
was not halved last time and its best loss did not improve since.

Losses: cross-entropy (APGD-CE) and the difference of logits ratio, untargeted
(APGD-DLR) or targeted (APGD-T).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_advprune.attacks.common import check_norm, flat_norm, per_sample, project, steepest_ascent
from jax_advprune.attacks.dispatch import AUTO, run_attack
from jax_advprune.attacks.objectives import cross_entropy

LogitsFn = Callable[[jax.Array], jax.Array]
MOMENTUM = 0.75
RHO = 0.75


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Untargeted DLR (B,): -(z_y - max_{i != y} z_i) / (z_(1) - z_(3)), z_(k) sorted descending."""
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return -(true_logit - jnp.max(others, axis=-1)) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Targeted DLR (B,): -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2); needs >= 4 classes."""
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return -(true_logit - target_logit) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


def checkpoints(n_iter: int) -> list[int]:
    """Iteration indices (0-based, < n_iter) after which the step-size rule is checked."""
    first = max(int(0.22 * n_iter), 1)
    shrink, minimum = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, length, at = [], first, first
    while at <= n_iter:
        points.append(at - 1)
        length = max(length - shrink, minimum)
        at += length
    return points


def apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps,
    steps: int = 100,
    norm: str = "linf",
    loss: str = "ce",
    targets: jax.Array | None = None,
    unroll: int | bool = 1,
    mesh=AUTO,
) -> jax.Array:
    """APGD from a random point of the eps-ball around the clean input.

    Args:
      logits_fn: images (B, H, W, C) in [0, 1] -> logits (B, K).
      x: clean images (B, H, W, C) float32 in [0, 1].
      y: int labels (B,).
      key: PRNG key of the random start.
      eps: radius, scalar or per-sample (B,), in units of `norm`.
      steps: iterations N (static).
      norm: 'linf' or 'l2'.
      loss: 'ce', 'dlr' or 'dlr_targeted' (then `targets` (B,) are the target classes).
      unroll: passed to `lax.fori_loop`; True is faster on XLA:CPU for short
        attacks but compiles slowly for long ones.
      mesh: 'auto', a Mesh or None, as for `pgd`; compiled once per function,
        settings and shapes, as `pgd` is.

    Returns:
      (B, H, W, C): per sample, the first misclassified iterate if any was found,
      else the iterate of highest loss; always inside the eps-ball and [0, 1].
    """
    check_norm(norm)
    return run_attack(
        _apgd,
        logits_fn,
        x,
        y,
        key,
        dynamic=dict(eps=eps, targets=targets),
        mesh=mesh,
        static=dict(steps=steps, norm=norm, loss=loss, unroll=unroll),
    )


def _apgd(logits_fn, x, y, key, *, eps, steps, norm, loss, targets, unroll):
    """The traceable APGD of `apgd` (same arguments)."""
    x = jnp.asarray(x, jnp.float32)
    if loss == "ce":
        loss_fn = lambda logits: cross_entropy(logits, y)  # noqa: E731
    elif loss == "dlr":
        loss_fn = lambda logits: dlr_loss(logits, y)  # noqa: E731
    elif loss == "dlr_targeted":
        if targets is None:
            raise ValueError("loss='dlr_targeted' needs targets")
        loss_fn = lambda logits: targeted_dlr_loss(logits, y, targets)  # noqa: E731
    else:
        raise ValueError(f"apgd loss must be 'ce', 'dlr' or 'dlr_targeted', got {loss!r}")
    eps_b = per_sample(eps, x)

    def loss_and_grad(x_adv):
        def total(z):
            logits = logits_fn(z)
            per = loss_fn(logits)
            return jnp.sum(per), (per, logits)

        (_, (per, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
        return per, jnp.argmax(logits, -1) != y, grad

    def to_ball(z):
        return jnp.clip(x + project(z - x, eps, norm), 0.0, 1.0)

    # Random start on the ball's surface, as the reference does.
    noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    scale = flat_norm(noise, norm)
    x_adv = to_ball(x + eps_b * noise / per_sample(scale + 1e-12, x))
    loss0, fooled0, grad0 = loss_and_grad(x_adv)
    batch = x.shape[0]
    check_at = jnp.asarray(checkpoints(steps), jnp.int32)

    state = {
        "x": x_adv,
        "x_prev": x_adv,
        "grad": grad0,
        "loss": loss0,
        "x_best": x_adv,
        "grad_best": grad0,
        "loss_best": loss0,
        "x_found": x_adv,
        "found": fooled0,
        "step": 2.0 * jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (batch,)),
        "increases": jnp.zeros((batch,), jnp.int32),
        "best_at_check": loss0,
        "halved_at_check": jnp.ones((batch,), bool),
        "since_check": jnp.zeros((), jnp.int32),
    }

    def body(i, s):
        momentum = jnp.where(i > 0, MOMENTUM, 1.0)
        z = to_ball(s["x"] + per_sample(s["step"], x) * steepest_ascent(s["grad"], norm))
        x_new = to_ball(s["x"] + momentum * (z - s["x"]) + (1.0 - momentum) * (s["x"] - s["x_prev"]))
        loss_new, fooled, grad = loss_and_grad(x_new)
        first_found = fooled & ~s["found"]
        improved = loss_new > s["loss_best"]
        s = dict(
            s,
            x=x_new,
            x_prev=s["x"],
            grad=grad,
            loss=loss_new,
            x_found=jnp.where(per_sample(first_found, x), x_new, s["x_found"]),
            found=s["found"] | fooled,
            x_best=jnp.where(per_sample(improved, x), x_new, s["x_best"]),
            grad_best=jnp.where(per_sample(improved, x), grad, s["grad_best"]),
            loss_best=jnp.where(improved, loss_new, s["loss_best"]),
            increases=s["increases"] + (loss_new > s["loss"]).astype(jnp.int32),
            since_check=s["since_check"] + 1,
        )
        at_check = jnp.any(check_at == i)
        stalled = s["increases"] <= RHO * s["since_check"]
        no_progress = ~s["halved_at_check"] & (s["best_at_check"] >= s["loss_best"])
        halve = at_check & (stalled | no_progress)
        halve_b = per_sample(halve, x)
        return dict(
            s,
            step=jnp.where(halve, s["step"] / 2.0, s["step"]),
            x=jnp.where(halve_b, s["x_best"], s["x"]),
            grad=jnp.where(halve_b, s["grad_best"], s["grad"]),
            halved_at_check=jnp.where(at_check, halve, s["halved_at_check"]),
            best_at_check=jnp.where(at_check, s["loss_best"], s["best_at_check"]),
            increases=jnp.where(at_check, 0, s["increases"]),
            since_check=jnp.where(at_check, 0, s["since_check"]),
        )

    s = jax.lax.fori_loop(0, steps, body, state, unroll=unroll)
    return jax.lax.stop_gradient(jnp.where(per_sample(s["found"], x), s["x_found"], s["x_best"]))
