"""Small pure helpers shared by the attacks: per-sample broadcasting, norms, projections.

Everything here works on a batch `x` of shape (B, ...) and treats axis 0 as the
sample axis. Nothing imports Flax or data code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")
_TINY = 1e-12


def to_unit_interval(images: jax.Array) -> jax.Array:
    """Images as float32 in [0, 1]: uint8 (any shape) is divided by 255, floats are taken as they are."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def check_norm(norm: str) -> None:
    """Raises ValueError unless `norm` is one of NORMS."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def per_sample(value, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar or a (B,) vector against `x` of shape (B, ...).

    Returns an array of shape () or (B, 1, ..., 1) in `x`'s dtype.
    """
    value = jnp.asarray(value, x.dtype)
    if value.ndim == 0:
        return value
    if value.shape != x.shape[:1]:
        raise ValueError(f"per-sample value has shape {value.shape}, expected () or ({x.shape[0]},)")
    return value.reshape(value.shape + (1,) * (x.ndim - 1))


def flat_norm(v: jax.Array, norm: str) -> jax.Array:
    """Per-sample norm of v (B, ...) -> (B,): 'linf' max-abs, 'l2' Euclidean, 'l1' sum-abs."""
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(flat * flat, axis=1))
    if norm == "l1":
        return jnp.sum(jnp.abs(flat), axis=1)
    raise ValueError(f"unknown norm {norm!r}")


def dual_norm_name(norm: str) -> str:
    """The dual of an attack norm: linf <-> l1, l2 <-> l2."""
    return {"linf": "l1", "l2": "l2"}[norm]


def project(delta: jax.Array, eps, norm: str) -> jax.Array:
    """Projects a perturbation delta (B, ...) onto the per-sample eps-ball of `norm`."""
    eps_b = per_sample(eps, delta)
    if norm == "linf":
        return jnp.clip(delta, -eps_b, eps_b)
    length = per_sample(flat_norm(delta, "l2"), delta)
    return delta * jnp.minimum(1.0, eps_b / (length + _TINY))


def steepest_ascent(grad: jax.Array, norm: str) -> jax.Array:
    """Unit-norm direction of steepest ascent for `norm`: sign(g) for linf, g/||g||_2 for l2."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / (per_sample(flat_norm(grad, "l2"), grad) + _TINY)


def random_in_ball(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """A random perturbation of x's shape inside the per-sample eps-ball.

    linf: uniform in the cube. l2: uniform in the ball (Gaussian direction,
    radius eps * u ** (1 / d)).
    """
    eps_b = per_sample(eps, x)
    if norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps_b
    key_dir, key_rad = jax.random.split(key)
    direction = jax.random.normal(key_dir, x.shape, x.dtype)
    direction = direction / (per_sample(flat_norm(direction, "l2"), x) + _TINY)
    dims = x[0].size
    radius = jax.random.uniform(key_rad, x.shape[:1], x.dtype) ** (1.0 / dims)
    return direction * per_sample(radius, x) * eps_b
