"""Clean, PGD and AutoAttack accuracy over a split, in fixed-shape batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jax_advprune import parallel
from jax_advprune.attacks import autoattack, pgd
from jax_advprune.attacks.common import to_unit_interval
from jax_advprune.resume_log import ResumeLog

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
    loss: str = "ce",
) -> Callable[..., dict[str, float]]:
    """evaluate(variables, images, labels, seed=0) -> clean and PGD-`steps` accuracy; compiled once.

    PGD: `loss` ('ce', 'cw' or 'cw_margin', see attacks.objectives), random start. images: (N, H, W, C) uint8, the same on every
    process; labels: (N,) int. Batches of `batch_size` (divisible by the mesh size)
    are split over the mesh's devices. Returns fractions in [0, 1] and n.
    """
    parallel.check_divisible(batch_size, mesh, "eval batch size")
    batch_correct = pgd_program(apply_fn, eps=eps, step_size=step_size, steps=steps, norm=norm, mesh=mesh, loss=loss)

    def evaluate(variables: dict, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
        variables = jax.device_put(variables, parallel.replicated(mesh))  # once, not per batch
        base_key = jax.random.PRNGKey(seed)
        correct = parallel.map_rows(
            lambda i, x, y: {"correct": batch_correct(variables, jax.random.fold_in(base_key, i), x, y)},
            lambda rows: (images[rows], labels[rows].astype(np.int32)),
            len(labels),
            batch_size,
            mesh,
        )["correct"]
        n = len(labels)
        return {"clean_accuracy": int(correct[:, 0].sum()) / n, "pgd_accuracy": int(correct[:, 1].sum()) / n, "n": n}

    return evaluate


def pgd_program(
    apply_fn: ApplyFn, *, eps: float, step_size: float, steps: int, norm: str, mesh: jax.sharding.Mesh, loss: str = "ce"
):
    """The jitted (variables, key, images uint8 (B, ...), labels (B,)) -> (B, 2) bool [clean correct, PGD correct]
    of `pgd_evaluator`, split over the mesh."""

    def shard_correct(variables, key, x_uint8, y):
        x = to_unit_interval(x_uint8)
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731
        x_adv = pgd(
            logits_fn, x, y, parallel.shard_key(key), eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss
        )
        return jnp.stack([jnp.argmax(logits_fn(x), -1) == y, jnp.argmax(logits_fn(x_adv), -1) == y], axis=1)

    return jax.jit(parallel.shard_over_batch(shard_correct, mesh, num_replicated=2))


def autoattack_evaluator(
    apply_fn: ApplyFn,
    *,
    version: str,
    eps: float,
    norm: str,
    apgd_steps: int,
    num_targets: int,
    fab_steps: int,
    square_queries: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> Callable[..., dict[str, float]]:
    """evaluate(variables, images, labels, seed=0) -> clean accuracy, the robust accuracy after each
    AutoAttack component, and the final one; compiled once for every set of weights.

    `version` 'autoattack' is the standard AutoAttack (APGD-CE, APGD-T, FAB-T,
    Square), 'autoattack_lite' APGD-CE then APGD-T; see `attacks.autoattack`. Keys:
    `clean_accuracy`, `<component>_accuracy` after each component but the last
    (e.g. `apgd_ce_accuracy`), and `<version>_accuracy`; fractions in [0, 1].
    images: (N, H, W, C) uint8, the same on every process; labels (N,) int.
    With `resume_dir`, each pass (a component, or one target class) saves the samples
    it broke there and a rerun applies them instead of recomputing: a killed or
    preempted evaluation resumes with the same result.
    """
    parallel.check_divisible(batch_size, mesh, "eval batch size")
    aa_version = {"autoattack": "standard", "autoattack_lite": "lite"}[version]

    def evaluate(
        variables: dict, images: np.ndarray, labels: np.ndarray, seed: int = 0, resume_dir: str | None = None
    ) -> dict[str, float]:
        logits_fn = Partial(
            apply_fn, jax.device_put(variables, parallel.replicated(mesh))
        )  # placed once, not per batch
        passes = (
            ResumeLog(resume_dir, "pass_", 3) if resume_dir else None
        )  # opened once: every process reuses the same passes

        def on_pass(k: int, hits: dict) -> None:
            if passes is not None:
                passes.save(k, **hits)
                passes.stop_if_preempted(f"{k + 1} AutoAttack passes")

        done = [passes.load(k) for k in range(passes.consecutive())] if passes is not None else []
        result = autoattack(
            logits_fn,
            images,
            labels,
            jax.random.PRNGKey(seed),
            eps=eps,
            norm=norm,
            version=aa_version,
            apgd_steps=apgd_steps,
            num_targets=num_targets,
            fab_steps=fab_steps,
            square_queries=square_queries,
            batch_size=batch_size,
            mesh=mesh,
            on_pass=on_pass,
            done_passes=done,
        )
        accuracies = {"clean_accuracy": result.clean_accuracy}
        for name, accuracy in zip(result.attacks[:-1], result.robust_accuracy[:-1]):
            accuracies[name.replace("-", "_") + "_accuracy"] = accuracy
        accuracies[f"{version}_accuracy"] = result.robust_accuracy[-1]
        return accuracies

    return evaluate
