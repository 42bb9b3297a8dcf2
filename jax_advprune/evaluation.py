"""Clean and PGD accuracy over a split, in fixed-shape batches."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks import pgd
from jax_advprune.attacks.apgd import apgd
from jax_advprune.attacks.common import to_unit_interval

ApplyFn = Callable[[dict, jax.Array], jax.Array]  # (variables, images in [0, 1]) -> logits, inference mode


def pgd_evaluator(
    apply_fn: ApplyFn,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> Callable[..., dict[str, float]]:
    """evaluate(variables, images, labels, seed=0) -> clean and PGD-`steps` accuracy; compiled once.

    PGD: CE loss, random start. images: (N, H, W, C) uint8, the same on every
    process; labels: (N,) int. Batches of `batch_size` (divisible by the mesh size)
    are split over the mesh's devices. Returns fractions in [0, 1] and n.
    """
    parallel.check_divisible(batch_size, mesh, "eval batch size")

    def shard_correct(variables, key, x_uint8, y):
        x = to_unit_interval(x_uint8)
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731
        x_adv = pgd(logits_fn, x, y, parallel.shard_key(key), eps=eps, step_size=step_size, steps=steps, norm=norm)
        return jnp.stack([jnp.argmax(logits_fn(x), -1) == y, jnp.argmax(logits_fn(x_adv), -1) == y], axis=1)

    batch_correct = jax.jit(parallel.shard_over_batch(shard_correct, mesh, num_replicated=2))

    def evaluate(variables: dict, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
        variables = jax.device_put(variables, parallel.replicated(mesh))  # once, not per batch
        base_key = jax.random.PRNGKey(seed)
        correct = parallel.map_rows(
            lambda i, x, y: {"correct": batch_correct(variables, jax.random.fold_in(base_key, i), x, y)},
            lambda rows: (images[rows], labels[rows].astype(np.int32)), len(labels), batch_size, mesh,
        )["correct"]
        n = len(labels)
        return {"clean_accuracy": int(correct[:, 0].sum()) / n, "pgd_accuracy": int(correct[:, 1].sum()) / n, "n": n}

    return evaluate


def autoattack_lite_evaluator(
    apply_fn: ApplyFn,
    *,
    eps: float,
    norm: str,
    steps: int,
    num_targets: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> Callable[..., dict[str, float]]:
    """evaluate(variables, images, labels, seed=0) -> APGD-CE, then APGD-T (targeted DLR) on the survivors,
    worst case per sample; compiled once.

    Every attack starts from the clean input (plus its own random start); APGD-T
    runs once per target class, the 2nd to (num_targets + 1)-th most likely clean
    class, each time only on the samples that are still robust, gathered into
    fixed-shape batches. images: (N, H, W, C) uint8, labels (N,) int.
    Returns clean, APGD-CE and final robust accuracy, fractions in [0, 1].
    """
    parallel.check_divisible(batch_size, mesh, "eval batch size")

    def shard_fooled(variables, key, target_rank, x_uint8, y):
        x = to_unit_interval(x_uint8)
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731
        clean_logits = logits_fn(x)
        key = parallel.shard_key(key)
        if target_rank is None:
            x_adv = apgd(logits_fn, x, y, key, eps=eps, steps=steps, norm=norm, loss="ce")
        else:
            ranked = jnp.argsort(-clean_logits, axis=-1)
            targets = jnp.take_along_axis(ranked, jnp.full((x.shape[0], 1), target_rank + 1), axis=-1)[:, 0]
            x_adv = apgd(logits_fn, x, y, key, eps=eps, steps=steps, norm=norm, loss="dlr_targeted", targets=targets)
        return jnp.stack([jnp.argmax(clean_logits, -1) != y, jnp.argmax(logits_fn(x_adv), -1) != y], axis=1)

    untargeted = jax.jit(parallel.shard_over_batch(lambda v, k, x, y: shard_fooled(v, k, None, x, y), mesh, num_replicated=2))
    targeted = jax.jit(parallel.shard_over_batch(shard_fooled, mesh, num_replicated=3))

    def evaluate(variables: dict, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
        variables = jax.device_put(variables, parallel.replicated(mesh))  # once, not per batch
        labels = np.asarray(labels, np.int32)
        robust = np.ones(len(labels), bool)  # attack 0 runs on every sample and also sets clean_correct
        clean_correct = np.zeros(len(labels), bool)
        base_key = jax.random.PRNGKey(seed)
        accuracies = {}
        for attack in range(num_targets + 1):
            todo = np.flatnonzero(robust)

            def fooled_by(i, x, y, attack=attack):
                key = jax.random.fold_in(jax.random.fold_in(base_key, attack), i)
                if attack == 0:
                    return {"fooled": untargeted(variables, key, x, y)}
                return {"fooled": targeted(variables, key, jnp.asarray(attack - 1), x, y)}

            if len(todo):
                fooled = parallel.map_rows(fooled_by, lambda rows: (images[todo[rows]], labels[todo[rows]]), len(todo), batch_size, mesh)["fooled"]
                robust[todo[fooled[:, 0] | fooled[:, 1]]] = False
                if attack == 0:
                    clean_correct[todo] = ~fooled[:, 0]
            if attack == 0:
                accuracies["clean_accuracy"] = float(clean_correct.mean())
                accuracies["apgd_ce_accuracy"] = float(robust.mean())
        accuracies["autoattack_lite_accuracy"] = float(robust.mean())
        return accuracies

    return evaluate

