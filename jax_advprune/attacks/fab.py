"""FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack").

The targeted Fast Adaptive Boundary attack, as AutoAttack runs it: for a target
class t, every iteration linearises the logit difference z_t - z_y at the
current point x1, projects both x1 and the clean x0 onto that hyperplane inside
the [0, 1] box (the minimal-norm projections below, ported from the reference
package `autoattack` and torchattacks), and moves to a convex combination of the
two projections, extrapolated by `eta`, biased towards x0 by at most `alpha_max`.
Each time x1 is adversarial, the smallest such perturbation is kept and x1 is
pulled back towards x0 by `beta`. Targets are the 2nd to (num_targets + 1)-th
most likely classes at x0.

`fab_target` is one target rank on a batch (what AutoAttack runs on the samples
still robust); `fab` runs every rank on the whole batch and keeps, per sample,
the smallest adversarial perturbation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_advprune.attacks.common import check_norm, flat_norm, per_sample
from jax_advprune.attacks.dispatch import AUTO, run_attack

LogitsFn = Callable[[jax.Array], jax.Array]
NO_ADVERSARIAL = 1e10  # distance recorded while no adversarial point was found (the reference's value)


class FabResult(NamedTuple):
    """Per-sample FAB-T outputs, leading shape (B,).

    x_adv: (B, H, W, C) the smallest adversarial point found (of any size), x where none was.
    distance: ||x_adv - x|| in the attack norm; inf where no adversarial point was found,
      0 where x is already misclassified.
    fooled: distance <= eps and x_adv misclassified: the sample is not robust at eps.
    """

    x_adv: jax.Array
    distance: jax.Array
    fooled: jax.Array


def project_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Minimal L-inf step d (N, D) with w.(t + d) = b and t + d in [0, 1]^D, for points t (N, D).

    w (N, D), b (N,). Where the hyperplane cannot be reached inside the box, the
    box corner closest to it. A vectorised port of the reference `projection_linf`.
    """
    n, dims = t.shape
    rows = jnp.arange(n)
    sign = jnp.where(jnp.sum(w * t, 1) - b >= 0, 1.0, -1.0)
    w, b = w * sign[:, None], b * sign
    a = (w < 0).astype(t.dtype)
    nonzero = (w != 0).astype(t.dtype)
    d = (a - t) * nonzero
    p = a - t * (2 * a - 1)
    order = jnp.argsort(p, axis=1)
    b = b - jnp.sum(w * t, 1)
    b0 = jnp.sum(w * d, 1)
    order_desc = order[:, ::-1]
    ws = jnp.take_along_axis(w, order_desc, 1)
    bs2 = -ws * jnp.take_along_axis(d, order_desc, 1)
    s = jnp.cumsum(jnp.abs(ws), 1)
    sb = jnp.cumsum(bs2, 1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * p[rows, order[:, 0]]
    whole = b - b2 > 0
    partial = (b - b0 > 0) & ~whole
    lb, ub = jnp.zeros((n,)), jnp.full((n,), dims - 1.0)
    for _ in range(math.ceil(math.log2(dims))):
        mid = jnp.floor((lb + ub) / 2)
        mid_i = mid.astype(jnp.int32)
        current = order[rows, dims - 1 - mid_i]
        above = b - (sb[rows, mid_i] - s[rows, mid_i] * p[rows, current]) > 0
        lb, ub = jnp.where(above, mid, lb), jnp.where(above, ub, mid)
    lb = lb.astype(jnp.int32)
    lam_whole = jnp.maximum((b - sb[:, -1]) / -s[:, -1], 0.0)[:, None]
    d_whole = (2 * a - 1) * lam_whole
    lam = jnp.maximum((b - sb[rows, lb]) / -s[rows, lb], 0.0)[:, None]
    d_partial = jnp.minimum(lam, d) * a + jnp.maximum(-lam, d) * (1 - a)
    d = jnp.where(whole[:, None], d_whole, jnp.where(partial[:, None], d_partial, d))
    return d * nonzero


def project_l2(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Minimal L2 step d (N, D) with w.(t + d) = b and t + d in [0, 1]^D, for points t (N, D).

    w (N, D), b (N,). A vectorised port of the reference `projection_l2`.
    """
    n, dims = t.shape
    rows = jnp.arange(n)
    c = jnp.sum(w * t, 1) - b
    sign = jnp.where(c >= 0, 1.0, -1.0)
    w, c = w * sign[:, None], c * sign
    tiny = jnp.abs(w) < 1e-8
    safe_w = jnp.where(tiny, 1.0, w)
    r = jnp.clip(jnp.maximum(t / safe_w, (t - 1) / safe_w), -1e12, 1e12)
    r = jnp.where(tiny | (r == -1e12), 1e12, r)
    order = jnp.argsort(r, axis=1)
    rs = jnp.take_along_axis(r, order, 1)
    rs2 = jnp.pad(rs[:, 1:], ((0, 0), (0, 1)))
    rs, rs2 = jnp.where(rs == 1e12, 0.0, rs), jnp.where(rs2 == 1e12, 0.0, rs2)
    w3s = jnp.take_along_axis(w * w, order, 1)
    w5 = jnp.sum(w3s, 1, keepdims=True)
    ws = w5 - jnp.cumsum(w3s, 1)
    d = jnp.where(tiny, 0.0, -(r * w))
    s = jnp.concatenate([-w5 * rs[:, :1], jnp.cumsum((rs - rs2) * ws, 1) - w5 * rs[:, :1]], 1)
    before = s[:, 0] + c < 0
    beyond = jnp.sum(d * w, 1) + c > 0
    between = ~(before | beyond)
    lb, ub = jnp.zeros((n,)), jnp.full((n,), dims - 1.0)
    for _ in range(math.ceil(math.log2(dims))):
        mid = jnp.floor((lb + ub) / 2)
        above = s[rows, mid.astype(jnp.int32)] + c > 0
        lb, ub = jnp.where(above, mid, lb), jnp.where(above, ub, mid)
    lb = lb.astype(jnp.int32)
    d_before = -(c / w5[:, 0])[:, None] * w
    ws_lb = ws[rows, lb]
    alpha = jnp.where(ws_lb == 0, 0.0, (s[rows, lb] + c) / jnp.where(ws_lb == 0, 1.0, ws_lb) + rs[rows, lb])
    inside = alpha[:, None] > r
    d_between = jnp.where(inside, d, -alpha[:, None] * w)
    d = jnp.where(before[:, None], d_before, jnp.where(between[:, None], d_between, d))
    return jnp.where(tiny, 0.0, d)


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def target_classes(clean_logits: jax.Array, rank) -> jax.Array:
    """The `rank`-th most likely class per sample (rank 1 = the top one) from logits (B, K) -> (B,)."""
    ranked = jnp.argsort(-clean_logits, axis=-1)
    return jnp.take_along_axis(
        ranked, jnp.broadcast_to(jnp.asarray(rank, jnp.int32) - 1, (clean_logits.shape[0], 1)), 1
    )[:, 0]


def fab_target(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps,
    rank,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    mesh=AUTO,
) -> FabResult:
    """FAB-T towards the `rank`-th most likely clean class (2 = the runner-up), on a batch.

    Args:
      logits_fn: images (B, H, W, C) in [0, 1] -> logits (B, K).
      x: clean images (B, H, W, C) float32 in [0, 1]; y: int labels (B,).
      key: PRNG key; used only by restarts after the first, which start at a
        random point at distance eps / 2 (the reference's schedule).
      eps: radius, scalar or (B,), in units of `norm`; it only decides `fooled`
        and the random starts: FAB minimises the distance.
      rank: target rank, int (may be traced: one compilation serves every rank).
      steps: iterations per restart; restarts: runs, each from x (the first) or a random start.

      mesh: 'auto', a Mesh or None, as for `pgd`; compiled once per function,
        settings and shapes (`rank` is not a setting: every rank shares one program).

    Returns:
      FabResult. Per iteration: two forward passes and one input gradient.
    """
    check_norm(norm)
    return run_attack(
        _fab_target,
        logits_fn,
        x,
        y,
        key,
        dynamic=dict(eps=eps, rank=rank),
        mesh=mesh,
        static=dict(norm=norm, steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta),
    )


def _fab_target(
    logits_fn, x, y, key, *, eps, rank, norm, steps, restarts, alpha_max, eta, beta, unroll: int | bool = 1
) -> FabResult:
    """The traceable FAB-T of `fab_target` (same arguments; `unroll` of the steps loop, for cost probes)."""
    project = PROJECTIONS[norm]
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    flat0 = x.reshape(batch, -1)
    clean_logits = logits_fn(x)
    targets = target_classes(clean_logits, rank)
    rows = jnp.arange(batch)

    def difference_and_gradient(x1):
        def total(z):
            logits = logits_fn(z)
            diff = logits[rows, targets] - logits[rows, y]
            return jnp.sum(diff), diff

        (_, diff), grad = jax.value_and_grad(total, has_aux=True)(x1)
        return diff, grad.reshape(batch, -1)

    def step(_, carry):
        x1, best, distance = carry
        diff, w = difference_and_gradient(x1)
        flat1 = x1.reshape(batch, -1)
        b = -diff + jnp.sum(w * flat1, 1)
        steps_to_plane = project(jnp.concatenate([flat1, flat0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        lengths = jnp.maximum(flat_norm(steps_to_plane, norm), 1e-8)
        from_x1, from_x0 = lengths[:batch], lengths[batch:]
        alpha = per_sample(jnp.clip(from_x1 / (from_x1 + from_x0), 0.0, alpha_max), x)
        d1, d0 = steps_to_plane[:batch].reshape(x.shape), steps_to_plane[batch:].reshape(x.shape)
        x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d0) * alpha, 0.0, 1.0)
        adversarial = jnp.argmax(logits_fn(x1), -1) != y
        length = flat_norm(x1 - x, norm)
        better = adversarial & (length < distance)
        best = jnp.where(per_sample(better, x), x1, best)
        distance = jnp.where(better, length, distance)
        x1 = jnp.where(per_sample(adversarial, x), x + (x1 - x) * beta, x1)
        return x1, best, distance

    def one_run(i, carry):
        best, distance = carry
        noise = (
            jax.random.uniform(jax.random.fold_in(key, i), x.shape, x.dtype, -1.0, 1.0)
            if norm == "linf"
            else jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        )
        radius = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
        start = x + per_sample(radius / flat_norm(noise, norm), x) * noise * 0.5
        start = jnp.where(i > 0, jnp.clip(start, 0.0, 1.0), x)
        _, best, distance = jax.lax.fori_loop(0, steps, step, (start, best, distance), unroll=unroll)
        return best, distance

    best, distance = jax.lax.fori_loop(0, restarts, one_run, (x, jnp.full((batch,), NO_ADVERSARIAL, x.dtype)))
    clean_wrong = jnp.argmax(clean_logits, -1) != y
    found = distance < NO_ADVERSARIAL
    distance = jnp.where(clean_wrong, 0.0, jnp.where(found, distance, jnp.inf))
    best = jnp.where(per_sample(clean_wrong | ~found, x), x, best)
    eps_b = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
    return FabResult(jax.lax.stop_gradient(best), distance, clean_wrong | (found & (distance <= eps_b)))


def fab(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps,
    norm: str = "linf",
    num_targets: int = 9,
    steps: int = 100,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    mesh=AUTO,
) -> FabResult:
    """FAB-T over target ranks 2 .. num_targets + 1 (capped at K - 1 targets), each on the whole batch;
    per sample the smallest adversarial perturbation over all targets. Defaults: AutoAttack's.

    Arguments as in `fab_target`; x (B, H, W, C) float32 in [0, 1], y (B,) int.
    """
    check_norm(norm)
    return run_attack(
        _fab,
        logits_fn,
        x,
        y,
        key,
        dynamic=dict(eps=eps),
        mesh=mesh,
        static=dict(
            norm=norm, num_targets=num_targets, steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta
        ),
    )


def _fab(logits_fn, x, y, key, *, eps, norm, num_targets, steps, restarts, alpha_max, eta, beta) -> FabResult:
    """The traceable FAB-T of `fab` (same arguments)."""
    x = jnp.asarray(x, jnp.float32)
    num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]

    def one_target(rank, best: FabResult) -> FabResult:
        run = _fab_target(
            logits_fn,
            x,
            y,
            jax.random.fold_in(key, rank),
            eps=eps,
            rank=rank,
            norm=norm,
            steps=steps,
            restarts=restarts,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
        )
        better = run.distance < best.distance
        return FabResult(
            jnp.where(per_sample(better, x), run.x_adv, best.x_adv),
            jnp.where(better, run.distance, best.distance),
            best.fooled | run.fooled,
        )

    nothing_yet = FabResult(x, jnp.full((x.shape[0],), jnp.inf, x.dtype), jnp.zeros((x.shape[0],), bool))
    return jax.lax.fori_loop(
        2, min(num_targets, num_classes - 1) + 2, one_target, nothing_yet
    )  # one compiled body for every target
