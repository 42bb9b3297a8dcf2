"""Model outputs over (a subset of) a pool: probabilities, penultimate features, true-class probability.

Sharded over the data mesh in fixed-shape chunks, for the scores of importance.py,
the training-history recorder and the extrapolation embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks import pgd
from jax_advprune.attacks.common import to_unit_interval
from jax_advprune.data.sources import Pool

FeaturesFn = Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]  # (variables, x in [0, 1]) -> (logits, features)


class Predictor:
    """predict(variables, key, images (B, H, W, C) uint8, labels (B,) int32) -> {'probs' (B, K), 'features' (B, D)},
    on arrays placed over the mesh (`parallel.shared_batch`); compiled once.

    With `attack` (keywords of `pgd`: eps, step_size, steps, norm), the outputs are
    those of PGD adversarial inputs (CE loss, random start) instead of clean ones.
    B must divide over the mesh. `place(variables)` puts weights on the mesh once.
    """

    def __init__(self, features_fn: FeaturesFn, *, mesh: jax.sharding.Mesh, attack: dict | None = None):
        self.mesh = mesh
        self._predict = predict_program(features_fn, mesh, attack)

    def place(self, variables: dict) -> dict:
        return jax.device_put(variables, parallel.replicated(self.mesh))

    def __call__(self, variables, key, images, labels) -> dict[str, jax.Array]:
        return self._predict(variables, key, images, labels)


def predict_program(features_fn: FeaturesFn, mesh, attack):
    """The jitted (variables, key, images uint8 (B, ...), labels (B,)) -> {'probs', 'features'} of `Predictor`."""

    def shard_predict(variables, key, x_uint8, y):
        x = to_unit_interval(x_uint8)
        if attack is not None:
            logits_fn = lambda z: features_fn(variables, z)[0]  # noqa: E731
            x = pgd(logits_fn, x, y, parallel.shard_key(key), **attack)
        logits, features = features_fn(variables, x)
        return {"probs": jax.nn.softmax(logits, axis=-1), "features": features}

    return jax.jit(parallel.shard_over_batch(shard_predict, mesh, num_replicated=2))


def pool_outputs(
    predict: Predictor,
    variables: dict,
    pool: Pool,
    indices: np.ndarray,
    *,
    chunk_size: int,
    seed: int = 0,
    keep: tuple[str, ...] = ("probs", "features"),
    out: dict[str, np.ndarray] | None = None,
    progress=None,
) -> dict[str, np.ndarray]:
    """`predict` over pool rows `indices` (M,) in chunks of `chunk_size` -> {'labels' (M,) int32, and each of `keep`}.

    `out` may hold preallocated (e.g. memory-mapped, for pool-sized embeddings) arrays to fill.
    `progress`: a metrics.Progress over the chunks.
    """
    variables = predict.place(variables)  # once, not per chunk
    base_key = jax.random.PRNGKey(seed)

    def compute(chunk, images, labels):
        result = predict(variables, jax.random.fold_in(base_key, chunk), images, labels)
        return {"labels": labels, **{name: result[name] for name in keep}}

    def read(rows):
        images, labels = pool.read(indices[rows])
        return images, labels.astype(np.int32)

    report = None if progress is None else lambda i, _: progress.update(i + 1)
    return parallel.map_rows(compute, read, len(indices), chunk_size, predict.mesh, out=out, on_chunk=report)


def true_class_probability(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y (M,) from probs (M, K) and labels (M,)."""
    return np.take_along_axis(probs, np.asarray(labels)[:, None], axis=1)[:, 0]
