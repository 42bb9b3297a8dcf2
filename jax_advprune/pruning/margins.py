"""DeepFool margins over a pool (PUMA's score): `attacks.deepfool` mapped over pool rows in chunks.

A margin here is a sample's distance to the decision boundary (not the
Carlini-Wagner logit margin of `attacks.objectives.cw_margin`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.tree_util import Partial

from jax_advprune import parallel
from jax_advprune.attacks import deepfool
from jax_advprune.data.sources import Pool
from jax_advprune.metrics import Progress


def margin_scores(
    apply_fn: Callable[[dict, jax.Array], jax.Array],
    variables: dict,
    pool: Pool,
    *,
    norm: str,
    max_iter: int,
    overshoot: float,
    candidates: int | None,
    slots: int,
    form: str = "foolbox",
    search_steps: int = 50,
    chunk_size: int,
    mesh: jax.sharding.Mesh,
    indices: np.ndarray | None = None,
    resume_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """DeepFool margins of pool rows `indices` (default: all) under apply_fn(variables, images in [0, 1]) -> logits.

    Reads the pool in fixed-shape chunks of `chunk_size` samples (the last one
    padded, its padding discarded) and runs `attacks.deepfool` on each over the
    mesh, `slots` at a time (divisible by the mesh size); its work queue makes
    the cost follow the samples' total iterations, not the slowest sample's.
    norm, max_iter, overshoot, candidates, form and search_steps are DeepFool's.
    With `resume_dir`, each finished chunk is saved there and chunks already there
    are loaded instead of recomputed, so a killed run resumes where it stopped.
    Returns `margin` (M,) float32 (signed, in units of the runner's norm on [0, 1]
    pixels), `converged` (M,) bool and `n_iter` (M,) int32, in the order of `indices`.
    """
    parallel.check_divisible(slots, mesh, "DeepFool slots")
    indices = np.arange(len(pool)) if indices is None else np.asarray(indices)
    logits_fn = Partial(apply_fn, jax.device_put(variables, parallel.replicated(mesh)))  # placed once, not per chunk

    def compute(_, images, labels):
        result = deepfool(
            logits_fn,
            images,
            labels,
            norm=norm,
            max_iter=max_iter,
            overshoot=overshoot,
            candidates=candidates,
            slots=slots,
            mesh=mesh,
            form=form,
            search_steps=search_steps,
        )
        return {"margin": result.margin, "converged": result.converged, "n_iter": result.n_iter}

    def read(rows):
        images, labels = pool.read(indices[rows])
        return images, labels.astype(np.int32)

    report = (
        None
        if progress is None
        else lambda i, done: progress.update(i + 1, mean_iterations=float(done["n_iter"].mean()))
    )
    out = parallel.map_rows(compute, read, len(indices), chunk_size, mesh, resume_dir=resume_dir, on_chunk=report)
    return {
        name: out.get(name, np.zeros(0, dtype))
        for name, dtype in (("margin", np.float32), ("converged", bool), ("n_iter", np.int32))
    }
