"""Training losses, built on optax's: per-sample vectors (B,) so callers can weight or mask them.

optax's one-hot `softmax_cross_entropy` is used rather than its integer-label form: the integer-label form computes
logsumexp(z) - z_y, which differs from -log_softmax(z)_y in the last bit for about a third of the samples; the
one-hot form is the same arithmetic as before, bit for bit, so no result moved.
"""

from __future__ import annotations

import jax
import optax


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy (B,) in nats of int labels (B,) against logits (B, K), with label smoothing.

    The target is (1 - s) * onehot(y) + s / K (`optax.smooth_labels`).
    """
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.losses.softmax_cross_entropy(logits, targets)


def trades_loss(
    clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array, beta: float, label_smoothing: float = 0.0
) -> jax.Array:
    """TRADES (Zhang et al. 2019) per sample (B,): CE_s(clean, y) + beta * KL(softmax(clean) || softmax(adv)).

    CE_s is the label-smoothed cross-entropy; gradients flow through both logits,
    as in the reference implementation (its `reduction='batchmean'` is the mean
    of this vector).
    """
    kl = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(adv_logits, axis=-1), jax.nn.log_softmax(clean_logits, axis=-1)
    )
    return smoothed_cross_entropy(clean_logits, labels, label_smoothing) + beta * kl
