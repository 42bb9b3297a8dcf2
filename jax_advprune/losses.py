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


def trades_loss(clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """TRADES (Zhang et al. 2019) per sample (B,): CE_s(clean, y) + beta * KL(softmax(clean) || softmax(adv)).

    CE_s is the label-smoothed cross-entropy; gradients flow through both logits,
    as in the reference implementation (its `reduction='batchmean'` is the mean
    of this vector).
    """
    clean_log_probs = jax.nn.log_softmax(clean_logits, axis=-1)
    kl = jnp.sum(jnp.exp(clean_log_probs) * (clean_log_probs - jax.nn.log_softmax(adv_logits, axis=-1)), axis=-1)
    return smoothed_cross_entropy(clean_logits, labels, label_smoothing) + beta * kl
