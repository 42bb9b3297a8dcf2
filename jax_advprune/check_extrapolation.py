"""How well the kNN extrapolation predicts computed scores, measured after a run on a held-out part of them.

    python -m jax_advprune.check_extrapolation --workdir runs/c10_extra [--holdout_fraction 0.1] [--seed 0]

The score phase of an extrapolation run keeps every computed score as a kNN reference
(`scoring.extrapolation.holdout_fraction = 0`, the reference's way: no expensive
scored row is wasted) and saves what a check needs: the computed scores
(scores/computed_scores.npz) and the embedding the kNN searched (scores/embedding.npy).
This command holds a random `--holdout_fraction` of the computed rows out, extrapolates
their scores from the others with the run's own kNN settings (k, metric, weighting),
and reports the Spearman rank correlation between the extrapolated and the computed
scores, plus the mean absolute error, in scores/extrapolation_check.json. It changes
no score and no selection; running it twice with the same seed gives the same figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from scipy.stats import spearmanr

from jax_advprune import run_dir, storage
from jax_advprune.errors import UserError


def _check_fraction(holdout_fraction: float) -> None:
    if not 0 < holdout_fraction < 1:
        raise UserError(f"--holdout_fraction must lie in (0, 1), got {holdout_fraction}")


def held_out_check(
    embedding: np.ndarray,
    query_rows: np.ndarray,
    rows: np.ndarray,
    values: np.ndarray,
    *,
    holdout_fraction: float,
    seed: int,
    knn_settings: dict,
    mesh,
) -> dict:
    """Spearman and mean absolute error of kNN-extrapolated against computed scores on a held-out part.

    embedding (Q, D): the kNN queries' embedding, row i belonging to pool row query_rows[i] (ascending);
    rows (M,), values (M,): the pool rows with a computed score and those scores. A `holdout_fraction` of them,
    drawn with `seed`, is extrapolated from the rest with knn_settings' k, metric and weighting."""
    from jax_advprune.pruning import knn

    _check_fraction(holdout_fraction)
    position = np.searchsorted(query_rows, rows)
    if np.any(position >= len(query_rows)) or np.any(query_rows[np.minimum(position, len(query_rows) - 1)] != rows):
        raise UserError("the computed rows are not all rows of the embedding: the score files do not belong together")
    held = np.random.default_rng([seed, 29]).random(len(rows)) < holdout_fraction
    k = int(knn_settings["k"])
    if held.sum() < 3 or (~held).sum() < k:
        raise UserError(
            f"{len(rows)} computed rows leave {int(held.sum())} held out and {int((~held).sum())} references "
            f"at --holdout_fraction {holdout_fraction}: need 3 held out and k={k} references"
        )
    predicted = knn.extrapolate_knn(
        np.asarray(embedding[position[held]], np.float32),
        np.asarray(embedding[position[~held]], np.float32),
        values[~held],
        k=k,
        metric=knn_settings["metric"],
        weighting=knn_settings["weighting"],
        mesh=mesh,
        engine=knn_settings.get("engine", "auto"),
    )
    return {
        "held_out": int(held.sum()),
        "references": int((~held).sum()),
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "spearman": float(spearmanr(predicted, values[held]).statistic),
        "mean_absolute_error": float(np.mean(np.abs(predicted - values[held]))),
        "k": k,
        "metric": knn_settings["metric"],
        "weighting": knn_settings["weighting"],
        "normalize": knn_settings.get("normalize", "none"),
    }


def check(workdir: str, holdout_fraction: float = 0.1, seed: int = 0) -> dict:
    """Reads the work directory's extrapolation files, runs `held_out_check` and writes its JSON -> the record."""
    from jax_advprune import parallel

    _check_fraction(holdout_fraction)  # before reading anything
    meta_path = os.path.join(run_dir.scores_dir(workdir), "meta.json")
    needed = (meta_path, run_dir.computed_scores_file(workdir), run_dir.embedding_file(workdir))
    missing = [p for p in needed if not storage.exists(p)]
    if missing:
        raise UserError(
            f"{workdir} has no finished extrapolation to check (missing {', '.join(missing)}): run the score phase "
            "with scoring.extrapolation.enabled=True first"
        )
    meta = storage.read_json(meta_path)
    settings = meta["extrapolation"]
    full = storage.load_npy(run_dir.score_file(workdir, meta["score"]))
    computed = storage.load_npz(run_dir.computed_scores_file(workdir))
    embedding = np.load(storage.local_copy(run_dir.embedding_file(workdir), tempfile.gettempdir()), mmap_mode="r")
    query_rows = np.flatnonzero(np.isfinite(full))  # the trainable rows, the embedding's row order
    if len(query_rows) != len(embedding):
        raise UserError(f"{len(embedding)} embedding rows for {len(query_rows)} scored pool rows in {workdir}")
    record = held_out_check(
        embedding,
        query_rows,
        computed["rows"],
        computed["values"].astype(np.float32),
        holdout_fraction=holdout_fraction,
        seed=seed,
        knn_settings=settings,
        mesh=parallel.make_mesh(),
    )
    record["score"] = meta["score"]
    storage.write_json(run_dir.extrapolation_check_file(workdir), record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--holdout_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        record = check(args.workdir, args.holdout_fraction, args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{record['score']}: Spearman {record['spearman']:.3f}, mean absolute error {record['mean_absolute_error']:.4g} "
        f"on {record['held_out']} held-out computed rows, extrapolated from {record['references']} "
        f"(k={record['k']}, {record['metric']}, {record['weighting']}, normalize {record['normalize']}); "
        f"written to {run_dir.extrapolation_check_file(args.workdir)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
