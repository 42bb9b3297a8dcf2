"""Per-sample attack objectives: (logits (B, C), target) -> loss (B,), to be maximised."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

AttackLoss = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of int labels (B,) under logits (B, C) -> (B,) nats (optax's, one-hot form: see `losses`)."""
    return optax.losses.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Carlini-Wagner margin max_{k != y} z_k - z_y (B,); positive once misclassified."""
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(others, axis=-1) - true_logit


def cw_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The CW loss of DM-Improves-AT's model selection (`CWLoss`, confidence 0), per sample (B,):
    -max(z_y - max_{k != y} z_k, 0) = min(cw_margin, 0). It is 0, with no gradient, once a sample is misclassified."""
    return jnp.minimum(cw_margin(logits, labels), 0.0)


def kl_to_clean(logits: jax.Array, clean_probs: jax.Array) -> jax.Array:
    """KL(clean_probs || softmax(logits)) (B,): the TRADES inner objective.

    `clean_probs` (B, C) is the softmax of the clean logits, passed as the target; a zero probability adds 0
    (`optax.losses.kl_divergence`).
    """
    return optax.losses.kl_divergence(jax.nn.log_softmax(logits, axis=-1), clean_probs)


ATTACK_LOSSES: dict[str, AttackLoss] = {
    "ce": cross_entropy,
    "cw_margin": cw_margin,
    "cw": cw_loss,
    "kl": kl_to_clean,
}


def get_attack_loss(loss: str | AttackLoss) -> AttackLoss:
    """Resolves a loss name from ATTACK_LOSSES, or returns a callable unchanged."""
    if callable(loss):
        return loss
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"attack loss must be one of {sorted(ATTACK_LOSSES)} or a callable, got {loss!r}")
    return ATTACK_LOSSES[loss]
