"""Training losses: per-sample vectors (B,) so callers can weight or mask them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy (B,) in nats of int labels (B,) against logits (B, K), with label smoothing.

    The target is (1 - s) * onehot(y) + s / K.
    """
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
