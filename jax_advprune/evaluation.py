"""Clean and PGD accuracy over a split, in fixed-shape batches."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune.attacks import pgd
from jax_advprune.batching import padded_batches

ApplyFn = Callable[[dict, jax.Array], jax.Array]  # (variables, images in [0, 1]) -> logits, inference mode


def evaluate_split(
    apply_fn: ApplyFn,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    batch_size: int,
    seed: int = 0,
) -> dict[str, float]:
    """Clean and PGD-`steps` (CE loss, random start) accuracy of a model on a split.

    images: (N, H, W, C) uint8; labels: (N,) int. Returns fractions in [0, 1] and n.
    """

    @jax.jit
    def batch_correct(variables, x_uint8, y, key):
        x = x_uint8.astype(jnp.float32) / 255.0
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731
        x_adv = pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, norm=norm)
        return jnp.argmax(logits_fn(x), -1) == y, jnp.argmax(logits_fn(x_adv), -1) == y

    clean = robust = 0
    base_key = jax.random.PRNGKey(seed)
    for i, (idx, valid) in enumerate(padded_batches(len(labels), batch_size)):
        ok_clean, ok_adv = batch_correct(variables, images[idx], labels[idx].astype(np.int32), jax.random.fold_in(base_key, i))
        clean += int(np.sum(np.asarray(ok_clean) & valid))
        robust += int(np.sum(np.asarray(ok_adv) & valid))
    n = len(labels)
    return {"clean_accuracy": clean / n, "pgd_accuracy": robust / n, "n": n}
