"""Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients.

The reference package `autoattack` (and torchattacks) schedule, margin loss
z_y - max_{k != y} z_k minimised until it is <= 0:
- L-inf: start from vertical stripes of +-eps per column and channel; each query
  sets one random square window (all channels, one random sign per channel) to
  +-eps from the clean image. The window side follows p(i) sqrt(H W) with p
  halved on the schedule of `fraction_at` (p_init 0.8, rescaled to the query budget).
- L2: start from 25 tiles of the centred pattern `eta(s)` with random signs,
  scaled to norm eps; each query moves the mass of one window into another,
  drawn with a new pattern, keeping the norm at eps.
A candidate is kept when it lowers the loss or misclassifies. Every sample of a
batch runs in lock-step (one window position per query, as in the reference);
a sample stops spending queries once it is misclassified, and the loop stops when
all are or the budget is spent.

The query budget `queries` counts every forward pass a sample gets, the initial one
included, so no sample is evaluated more than `queries` times (the reference
allows queries + 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune.attacks.common import check_norm, flat_norm, per_sample
from jax_advprune.attacks.dispatch import AUTO, run_attack
from jax_advprune.attacks.objectives import cw_margin

LogitsFn = Callable[[jax.Array], jax.Array]
# p is divided by these factors once the rescaled query index (i / queries * 10000) passes each bound.
_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareResult(NamedTuple):
    """Per-sample Square outputs, leading shape (B,).

    x_adv: (B, H, W, C) the best point found, inside the eps-ball and [0, 1].
    fooled: x_adv is misclassified.
    queries: (B,) int32 forward passes spent on the sample (<= the budget).
    """

    x_adv: jax.Array
    fooled: jax.Array
    queries: jax.Array


def fraction_at(i, queries: int, p_init: float) -> jax.Array:
    """The fraction p of pixels changed at query i (traced int) of a `queries` budget: p_init / 2**k."""
    rescaled = jnp.floor(i / queries * 10000)
    halvings = jnp.sum(rescaled > jnp.asarray(_SCHEDULE_BOUNDS))
    return p_init / (2.0 ** jnp.where(halvings == 0, 0, halvings))


def _rectangles(rows: int, cols: int) -> np.ndarray:
    """The reference `eta_rectangles`: nested rectangles weighted 1/(k+1)^2, unit L2 norm, (rows, cols)."""
    delta = np.zeros((rows, cols), np.float32)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top, 0) : min(top + 2 * k + 1, rows), max(left, 0) : min(left + 2 * k + 1, cols)] += (
            1.0 / (k + 1) ** 2
        )
        top, left = top - 1, left - 1
    return delta / np.sqrt(np.sum(delta**2))


def window_pattern(s: int) -> np.ndarray:
    """The reference L2 window `eta(s)` (s, s): + rectangles above, - below, unit L2 norm (before its random transpose)."""
    delta = np.zeros((s, s), np.float32)
    delta[: s // 2] = _rectangles(s // 2, s)
    delta[s // 2 :] = -_rectangles(s - s // 2, s)
    return delta / np.sqrt(np.sum(delta**2))


def _pattern_table(size: int) -> np.ndarray:
    """(size + 1, size, size): entry s holds window_pattern(s) in its top-left corner (zeros for s < 2)."""
    table = np.zeros((size + 1, size, size), np.float32)
    for s in range(2, size + 1):
        table[s, :s, :s] = window_pattern(s)
    return table


def _window(height: int, width: int, top, left, side) -> jax.Array:
    """(H, W, 1) float mask of the side x side window at (top, left)."""
    r, c = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (r >= top) & (r < top + side) & (c >= left) & (c < left + side)
    return inside[:, :, None].astype(jnp.float32)


def _random_corner(key, extent: int, side) -> jax.Array:
    """The reference's random_int(0, extent - side): floor(u (extent - side)), u ~ U[0, 1)."""
    return jnp.floor(jax.random.uniform(key) * (extent - side)).astype(jnp.int32)


def _margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """z_y - max_{k != y} z_k (B,); <= 0 once misclassified (the negated Carlini-Wagner margin)."""
    return -cw_margin(logits, y)


def _random_signs(key, shape) -> jax.Array:
    return jnp.where(jax.random.uniform(key, shape) > 0.5, 1.0, -1.0)


def square(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    mesh=AUTO,
) -> SquareResult:
    """Square Attack with the margin loss, untargeted, one run (AutoAttack's settings).

    Args:
      logits_fn: images (B, H, W, C) in [0, 1] -> logits (B, K); called once per query
        on the whole batch.
      x: clean images (B, H, W, C) float32 in [0, 1], H == W; y: int labels (B,).
      key: PRNG key of every random choice.
      eps: radius, scalar or (B,), in units of `norm`.
      queries: forward passes per sample at most, the initial one included.
      p_init: initial fraction of pixels in the window.
      mesh: 'auto', a Mesh or None, as for `pgd`: with several devices each runs
        its share of the batch in lock-step on its own random windows.

    Returns:
      SquareResult.
    """
    check_norm(norm)
    _, height, width, _ = jnp.shape(x)
    if height != width:
        raise ValueError(f"square needs square images, got {height}x{width}")
    if norm == "l2" and height < 5:
        raise ValueError(f"square's L2 start tiles the image in 5 x 5 windows: needs H >= 5, got {height}")
    if queries < 1:
        raise ValueError(f"square needs a budget of at least 1 query, got {queries}")
    return run_attack(
        _square,
        logits_fn,
        x,
        y,
        key,
        dynamic=dict(eps=eps),
        mesh=mesh,
        static=dict(norm=norm, queries=queries, p_init=p_init),
    )


def _square(logits_fn, x, y, key, *, eps, norm, queries, p_init) -> SquareResult:
    """The traceable Square Attack of `square` (same arguments)."""
    x = jnp.asarray(x, jnp.float32)
    batch, height, width, channels = x.shape
    eps_b = per_sample(eps, x)
    key_init, key_loop = jax.random.split(key)

    if norm == "linf":
        start = x + eps_b * _random_signs(key_init, (batch, 1, width, channels))
    else:
        side = height // 5
        offset = (height - side * 5) // 2
        delta = jnp.zeros_like(x)
        tile = 0
        for top in range(offset, offset + side * (height // side), side):
            for left in range(offset, offset + side * (width // side), side):
                key_tile = jax.random.fold_in(key_init, tile)
                pattern = jnp.asarray(window_pattern(side))
                pattern = jnp.where(jax.random.uniform(jax.random.fold_in(key_tile, 0)) > 0.5, pattern.T, pattern)
                signs = _random_signs(jax.random.fold_in(key_tile, 1), (batch, 1, 1, channels))
                delta = delta.at[:, top : top + side, left : left + side, :].add(pattern[None, :, :, None] * signs)
                tile += 1
        start = x + delta / per_sample(flat_norm(delta, "l2") + 1e-12, x) * eps_b
    best = jnp.clip(start, 0.0, 1.0)
    margin = _margin(logits_fn(best), y)
    table = jnp.asarray(_pattern_table(height))
    fraction_scale = height * width  # p * n_features / channels

    def linf_candidate(k, i, best):
        side = jnp.maximum(jnp.round(jnp.sqrt(fraction_at(i, queries, p_init) * fraction_scale)), 1).astype(jnp.int32)
        k_top, k_left, k_sign = jax.random.split(k, 3)
        window = _window(height, width, _random_corner(k_top, height, side), _random_corner(k_left, width, side), side)
        signs = _random_signs(k_sign, (channels,))
        candidate = best + window[None] * 2.0 * eps_b * signs
        return jnp.clip(jnp.clip(candidate, x - eps_b, x + eps_b), 0.0, 1.0)

    def l2_candidate(k, i, best):
        side = jnp.maximum(jnp.round(jnp.sqrt(fraction_at(i, queries, p_init) * fraction_scale)), 3).astype(jnp.int32)
        side = jnp.minimum(side + (side % 2 == 0), height)
        k_top, k_left, k_top2, k_left2, k_flip, k_sign = jax.random.split(k, 6)
        top, left = _random_corner(k_top, height, side), _random_corner(k_left, width, side)
        window = _window(height, width, top, left, side)[None]
        window2 = _window(
            height, width, _random_corner(k_top2, height, side), _random_corner(k_left2, width, side), side
        )[None]
        delta = best - x

        def l2_over(v, axes):
            return jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))

        in_window = l2_over(delta * window, (1, 2))  # (B, 1, 1, C)
        image_norm = l2_over(delta, (1, 2, 3))  # (B, 1, 1, 1)
        windows_norm = l2_over(delta * jnp.maximum(window, window2), (1, 2, 3))
        pattern = table[side]
        pattern = jnp.where(jax.random.uniform(k_flip) > 0.5, pattern.T, pattern)
        pattern = jnp.roll(pattern, (top, left), axis=(0, 1))[None, :, :, None]
        new = pattern * _random_signs(k_sign, (batch, 1, 1, channels)) + delta * window / (1e-12 + in_window)
        budget = jnp.sqrt(jnp.maximum(eps_b**2 - image_norm**2, 0.0) / channels + windows_norm**2)
        new = new / (1e-12 + l2_over(new, (1, 2))) * budget
        delta = delta * (1 - window2)
        delta = delta * (1 - window) + new * window
        return jnp.clip(x + delta / per_sample(flat_norm(delta, "l2") + 1e-12, x) * eps_b, 0.0, 1.0)

    candidate_at = linf_candidate if norm == "linf" else l2_candidate

    def go_on(carry):
        i, _, margin, _ = carry
        return (i < queries - 1) & jnp.any(margin > 0)

    def query(carry):
        i, best, margin, spent = carry
        candidate = candidate_at(jax.random.fold_in(key_loop, i), i, best)
        new_margin = _margin(logits_fn(candidate), y)
        active = margin > 0
        accept = active & ((new_margin < margin) | (new_margin <= 0))
        best = jnp.where(per_sample(accept, x), candidate, best)
        return i + 1, best, jnp.where(accept, new_margin, margin), spent + active.astype(jnp.int32)

    _, best, margin, spent = jax.lax.while_loop(
        go_on, query, (jnp.zeros((), jnp.int32), best, margin, jnp.ones((batch,), jnp.int32))
    )
    return SquareResult(jax.lax.stop_gradient(best), margin <= 0, spent)
