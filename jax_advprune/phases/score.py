"""Score phase: a score for every trainable pool row -> scores/<score>.npy (+ extras), scores/meta.json.

Scores that need a model train one (or `num_models` for el2n / grand) on the
scored rows; with scoring.extrapolation.enabled the scored rows are a subset and
every other row gets the mean score of its k nearest scored rows in an embedding:
the scoring model's penultimate features, or those of the weights named by
scoring.extrapolation.embedding_from (Nieth et al. use SSCD).

History scores (forgetting, du, fp) record the scored rows' true-class probability
during training (scoring.history_protocol):
  'mixed'      one run on the originals plus the scored synthetic rows, batches mixed
               as in train.original_fraction, a record every epoch of
               ceil(len(original split) / batch) steps;
  'reference'  Nieth et al.'s code: one run per group (the scored originals, the scored
               synthetic rows), each on its group alone in plain epochs, a record after
               every full pass; with pruning.scope='synthetic' the originals are not scored.
scoring.history_early_stop > 0 ends a history run after that many validations
without a better robust accuracy (the reference's --early-stop-diff).
"""

from __future__ import annotations

import copy
import logging
import os
import time

import jax
import numpy as np
from scipy.stats import spearmanr

from jax_advprune import run_dir, storage
from jax_advprune.data.sources import Pool
from jax_advprune.data.splits import Data
from jax_advprune.metrics import Progress
from jax_advprune.phases.common import apply_fn, build_model, features_fn, section
from jax_advprune.phases.train import batch_plan, train_model
from jax_advprune.phases.weights import embedding_config, load_variables
from jax_advprune.pruning import importance, margins, predictions
from jax_advprune.pruning import knn as knn_lib
from jax_advprune.resume_log import ResumeLog

log = logging.getLogger("jax_advprune")

NAME = "score"
HISTORY_SCORES = ("forgetting", "du", "fp")
HISTORY_PROTOCOLS = ("mixed", "reference")


def settings(config) -> dict:
    return section(config, "data", "model", "attack", "train", "scoring", drop=("epochs",)) | {"seed": config.seed}


def needed(config) -> bool:
    """Random pruning ranks nothing: the phase is skipped."""
    return config.pruning.strategy != "random"


class HistoryRecorder:
    """Records, every `every` steps (an epoch), the true-class probability and correctness of the scored
    samples under the training model (raw weights; clean or PGD inputs), one file per epoch.

    Files are written atomically and an existing epoch is not recomputed, so a
    resumed run completes the same history. `load()` -> (p_true (E, M), correct (E, M)).
    """

    def __init__(
        self, predict, pool: Pool, indices: np.ndarray, *, every: int, out_dir: str, chunk_size: int, seed: int
    ):
        self.predict, self.pool, self.indices, self.every = predict, pool, indices, every
        self.out_dir, self.chunk_size, self.seed = out_dir, chunk_size, seed
        self.log = ResumeLog(out_dir, "epoch_", 5)  # opened once: every process records the same epochs

    def __call__(self, state, step: int) -> None:
        if step % self.every or self.log.has(step // self.every):
            return
        out = predictions.pool_outputs(
            self.predict,
            state.variables(),
            self.pool,
            self.indices,
            chunk_size=self.chunk_size,
            seed=self.seed + step,
            keep=("probs",),
        )
        p_true = predictions.true_class_probability(out["probs"], out["labels"])
        self.log.save(step // self.every, p_true=p_true, correct=np.argmax(out["probs"], axis=1) == out["labels"])

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        records = [self.log.load(epoch) for epoch in self.log.indices(relist=True)]
        return np.stack([r["p_true"] for r in records]), np.stack([r["correct"] for r in records])


def reference_protocol(config) -> bool:
    """Whether the score is a history score recorded with Nieth et al.'s protocol (scoring.history_protocol)."""
    return config.scoring.score in HISTORY_SCORES and config.scoring.history_protocol == "reference"


def scored_indices(config, data: Data) -> np.ndarray:
    """Pool rows that get a computed score: the trainable originals (not with the reference history protocol
    and pruning.scope='synthetic': they are never pruned, and that protocol trains nothing on them, unless
    scoring.extrapolation.original_references wants them as kNN references) plus every trainable synthetic row,
    or with extrapolation `scoring.extrapolation.subset_size` of them drawn with its seed."""
    ext = config.scoring.extrapolation
    synthetic = np.flatnonzero(data.trainable & data.pool.is_synthetic)
    if ext.enabled:
        synthetic = np.random.default_rng([ext.seed, 13]).choice(synthetic, ext.subset_size, replace=False)
    skip_originals = (
        reference_protocol(config)
        and config.pruning.scope == "synthetic"
        and not (ext.enabled and ext.original_references)
    )
    originals = np.zeros(0, np.int64) if skip_originals else np.flatnonzero(data.trainable & ~data.pool.is_synthetic)
    return np.sort(np.concatenate([originals, synthetic]))


def history_groups(data: Data, scored: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The reference protocol's separate runs: [(name, pool rows)] for the scored originals and the scored
    synthetic rows, the empty ones left out."""
    synthetic = data.pool.is_synthetic[scored]
    return [
        (name, rows) for name, rows in (("original", scored[~synthetic]), ("synthetic", scored[synthetic])) if len(rows)
    ]


def pass_config(config):
    """The config of a reference-protocol history run: plain epochs over its rows (one epoch = one full pass),
    validated after every pass."""
    run_config = copy.deepcopy(config)
    run_config.train.original_fraction = 0.0
    run_config.train.validation_every_epochs = 1.0
    return run_config


def run(config, workdir: str, data: Data, mesh, initial: dict | None = None) -> None:
    """Computes config.scoring.score for the pool -> scores/<score>.npy (+ extras) and scores/meta.json.

    initial: the scoring model's variables (scoring.init_from); without them one
    (or scoring.num_models) is trained on the scored rows.
    """
    out_dir = run_dir.scores_dir(workdir)
    scfg = config.scoring
    if not needed(config):
        log.info("[score] not needed by strategy 'random', skipped")
        return
    if run_dir.is_complete(workdir, NAME):
        log.info("[score] complete, skipped (%s)", out_dir)
        return
    run_dir.record_settings(workdir, NAME, settings(config))
    start = time.perf_counter()
    n = len(data.pool)
    scored = scored_indices(config, data)
    meta = {
        "score": scfg.score,
        "seed": config.seed + 1,
        "scored": len(scored),
        "num_samples": n,
        "weights": "ema" if scfg.use_ema else "raw",
        "settings": scfg.to_dict(),
    }
    extras: dict[str, np.ndarray] = {}
    # One compiled clean forward pass (probabilities, features) serves every scoring model and the embedding.
    predict = predictions.Predictor(features_fn(build_model(config)), mesh=mesh)
    if scfg.score == "random":
        values, variables = importance.random_scores(len(scored), config.seed), None
    else:
        values, extras, variables = _computed_scores(config, workdir, data, mesh, scored, meta, predict, initial)
    full = np.full(n, np.nan, np.float32)  # rows without a score (the validation slice) stay NaN
    full[scored] = values
    if scfg.extrapolation.enabled:
        full, meta["extrapolation"] = _extrapolate(config, workdir, data, mesh, predict, variables, scored, values)
        storage.save_npz(run_dir.computed_scores_file(workdir), rows=scored.astype(np.int64), values=values)
    for name, array in extras.items():
        whole = np.zeros(n, array.dtype)
        whole[scored] = array
        storage.save_npy(os.path.join(out_dir, f"{name}.npy"), whole)
    storage.save_npy(run_dir.score_file(workdir, scfg.score), full)
    finite = full[np.isfinite(full)]
    meta.update(
        seconds=time.perf_counter() - start,
        quantiles={str(q): float(np.quantile(finite, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    )
    if scfg.score == "margin":
        meta["fraction_correct"] = float((finite > 0).mean())
    storage.write_json(os.path.join(out_dir, "meta.json"), meta)
    log.info(
        "[score] %s of %d samples (%d computed) in %.1fs, median %.4g",
        scfg.score,
        int(np.isfinite(full).sum()),
        len(scored),
        meta["seconds"],
        np.median(finite),
    )


def _row_mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def _history_predictor(config, mesh, predict: predictions.Predictor) -> predictions.Predictor:
    """What the history records: `predict` (clean inputs), or with scoring.history_inputs='pgd' a predictor of
    the training attack's PGD inputs (compiled once for every history run of the phase)."""
    if config.scoring.history_inputs != "pgd":
        return predict
    a = config.attack
    return predictions.Predictor(
        features_fn(build_model(config)),
        mesh=mesh,
        attack=dict(eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm),
    )


def _history_recorder(config, data: Data, rows: np.ndarray, predict, out_dir: str) -> HistoryRecorder:
    """Records `rows`' true-class probability under `predict` every epoch of `config`'s training on them."""
    every = batch_plan(config, data, _row_mask(len(data.pool), rows), seed=0).steps_per_epoch
    return HistoryRecorder(
        predict,
        data.pool,
        rows,
        every=every,
        out_dir=out_dir,
        chunk_size=config.scoring.chunk_size,
        seed=config.seed + 1,
    )


def _history_score(config, p_true: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """scoring.score of a history: p_true, correct (E, M) -> (M,)."""
    scfg = config.scoring
    return {
        "forgetting": lambda: importance.forgetting_events(correct),
        "fp": lambda: importance.frequency_score(p_true),
        "du": lambda: importance.dynamic_uncertainty(p_true, window=scfg.du_window),
    }[scfg.score]()


def _history_min_steps(config, every: int) -> int:
    """Early stopping never leaves DU fewer records than its window."""
    return every * config.scoring.du_window if config.scoring.score == "du" else 0


def _train_scoring_model(
    config,
    workdir: str,
    data: Data,
    mesh,
    rows: np.ndarray,
    meta: dict,
    *,
    suffix: str,
    seed: int,
    recorder: HistoryRecorder | None = None,
):
    """Adversarial training of a scoring model on `rows` at eps = attack.eps -> its final TrainState.

    Checkpoints in <workdir>/scoring_model<suffix>/, listed in meta['model_checkpoints']; phase 'score/train<suffix>'.
    With a history `recorder` it records every epoch and stops early by scoring.history_early_stop.
    """
    n = len(data.pool)
    ckpt_dir = run_dir.scoring_checkpoint_dir(workdir, suffix)
    history = (
        {}
        if recorder is None
        else dict(
            callbacks=(recorder,),
            early_stop=config.scoring.history_early_stop,
            min_steps=_history_min_steps(config, recorder.every),
        )
    )
    _, state = train_model(
        config,
        data,
        mesh,
        _row_mask(n, rows),
        np.full(n, config.attack.eps, np.float32),
        epochs=config.scoring.train_epochs,
        ckpt_dir=ckpt_dir,
        metrics_path=run_dir.metrics_file(workdir),
        phase=f"score/train{suffix}",
        seed=seed,
        **history,
    )
    meta.setdefault("model_checkpoints", []).append(os.path.join(ckpt_dir, str(int(state.step))))
    return state


def _reference_histories(config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, predict):
    """Nieth et al.'s protocol: one history run per group (`history_groups`), on that group alone, one record per full
    pass -> (scores of the `scored` rows (M,), the variables of the last group's model: the synthetic one when present)."""
    run_config = pass_config(config)
    values = np.zeros(len(scored), np.float32)
    variables = None
    for name, rows in history_groups(data, scored):
        recorder = _history_recorder(run_config, data, rows, predict, run_dir.history_dir(workdir, name))
        state = _train_scoring_model(
            run_config, workdir, data, mesh, rows, meta, suffix=f"_{name}", seed=config.seed + 1, recorder=recorder
        )
        p_true, correct = recorder.load()
        values[np.searchsorted(scored, rows)] = _history_score(config, p_true, correct)
        meta.setdefault("history_runs", {})[name] = {
            "rows": int(len(rows)),
            "records": int(p_true.shape[0]),
            "steps": int(state.step),
            "steps_per_record": recorder.every,
        }
        variables = state.variables(ema=config.scoring.use_ema)
    return values, variables


def _scoring_variables(
    config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, recorder, initial
) -> list[dict]:
    """The scoring models' variables (EMA weights with scoring.use_ema): `initial`, or models trained on the `scored` rows."""
    scfg = config.scoring
    if initial is not None:
        meta["init_from"] = scfg.init_from
        return [initial]
    return [
        _train_scoring_model(
            config,
            workdir,
            data,
            mesh,
            scored,
            meta,
            suffix="" if m == 0 else f"_{m}",
            seed=config.seed + 1 + m,
            recorder=recorder,
        ).variables(ema=scfg.use_ema)
        for m in range(scfg.num_models if scfg.score in ("el2n", "grand") else 1)
    ]


def _computed_scores(
    config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, predict: predictions.Predictor, initial
):
    """Scores of the `scored` rows under the scoring model(s) -> (values (M,), extras, the last model's variables).

    Adds the checkpoints and score-specific facts to `meta`.
    """
    scfg = config.scoring
    if reference_protocol(config):
        values, variables = _reference_histories(
            config, workdir, data, mesh, scored, meta, _history_predictor(config, mesh, predict)
        )
        return values, {}, variables
    recorder = None
    if scfg.score in HISTORY_SCORES:
        recorder = _history_recorder(
            config, data, scored, _history_predictor(config, mesh, predict), run_dir.history_dir(workdir)
        )
    models = _scoring_variables(config, workdir, data, mesh, scored, meta, recorder, initial)
    extras = {}
    if scfg.score == "margin":
        values, extras = _margins(config, workdir, data, mesh, models[0], scored, meta)
    elif scfg.score in ("el2n", "grand"):
        keep = ("probs", "features") if scfg.score == "grand" else ("probs",)
        outputs = [
            predictions.pool_outputs(predict, v, data.pool, scored, chunk_size=scfg.chunk_size, keep=keep)
            for v in models
        ]
        if scfg.score == "el2n":
            values = np.mean([importance.el2n(o["probs"], o["labels"]) for o in outputs], axis=0)
        else:
            values = np.mean(
                [importance.grand_last_layer(o["probs"], o["labels"], o["features"]) for o in outputs], axis=0
            )
    else:
        p_true, correct = recorder.load()
        meta["history_epochs"] = int(p_true.shape[0])
        values = _history_score(config, p_true, correct)
    return values, extras, models[-1]


def _progress(config, workdir: str, phase: str, rows: int, chunk: int) -> Progress:
    """Progress over `rows` in chunks of `chunk` (rate, ETA), recorded in metrics.jsonl by process 0."""
    metrics_path = run_dir.metrics_file(workdir) if storage.is_writer() else None
    return Progress(phase, -(-rows // chunk), chunk, metrics_path, every_s=config.train.log_every_s)


def _margins(config, workdir: str, data: Data, mesh, variables: dict, scored: np.ndarray, meta: dict):
    """DeepFool margins of the scored rows under the scoring model -> (margins (M,), {'converged', 'n_iter'})."""
    scfg = config.scoring
    df = scfg.deepfool
    progress = _progress(config, workdir, "score/deepfool", len(scored), scfg.chunk_size)
    result = margins.margin_scores(
        apply_fn(build_model(config)),
        variables,
        data.pool,
        norm=df.norm,
        max_iter=df.max_iter,
        overshoot=df.overshoot,
        candidates=df.candidates or None,
        slots=scfg.slots,
        form=df.form,
        search_steps=df.search_steps,
        chunk_size=scfg.chunk_size,
        mesh=mesh,
        indices=scored,
        resume_dir=run_dir.deepfool_chunks_dir(workdir),
        progress=progress,
    )
    progress.close()
    meta.update(
        deepfool=df.to_dict(),
        fraction_converged=float(result["converged"].mean()),
        mean_iterations=float(result["n_iter"].mean()),
    )
    return result["margin"], {"converged": result["converged"], "n_iter": result["n_iter"]}


def _extrapolate(
    config,
    workdir: str,
    data: Data,
    mesh,
    predict: predictions.Predictor,
    variables: dict,
    scored: np.ndarray,
    values: np.ndarray,
):
    """Fills every trainable row's score from its k nearest scored rows in the embedding -> (scores (N,), report).

    The embedding is `predict`'s penultimate features under `variables` (the scoring model), or with
    scoring.extrapolation.embedding_from those of the weights it names.

    A `holdout_fraction` of the scored rows is left out of the references and
    extrapolated too: the Spearman correlation there measures the extrapolation
    (with 0, `python -m jax_advprune.check_extrapolation` measures it afterwards).
    With `normalize='l2'` both sides are unit-length before the search.
    """
    ext = config.scoring.extrapolation
    if ext.embedding_from:  # the penultimate features of other weights (the paper: SSCD)
        embed_config = embedding_config(config)
        predict = predictions.Predictor(features_fn(build_model(embed_config)), mesh=mesh)
        variables = load_variables(ext.embedding_from, embed_config, data.pool.image_shape)
    holdout = np.random.default_rng([ext.seed, 17]).random(len(scored)) < ext.holdout_fraction
    refs = scored[~holdout]
    queries = np.flatnonzero(data.trainable)
    chunk = config.scoring.chunk_size
    ref_features = predictions.pool_outputs(predict, variables, data.pool, refs, chunk_size=chunk, keep=("features",))[
        "features"
    ]
    ref_features = knn_lib.normalize_rows(ref_features, ext.normalize)
    embedding_path = run_dir.embedding_file(workdir)  # (trainable rows, D): the queries' embedding, kept
    # Every process fills its own memory-mapped copy (beside the file, or in TMPDIR for a remote work dir); process 0 keeps its.
    keep_copy = storage.atomic_output if storage.is_writer() else storage.scratch_file
    with keep_copy(embedding_path, f".{jax.process_index()}.npy") as tmp_path:
        embedding = np.lib.format.open_memmap(
            tmp_path, mode="w+", dtype=np.float32, shape=(len(queries), ref_features.shape[1])
        )
        predictions.pool_outputs(
            predict,
            variables,
            data.pool,
            queries,
            chunk_size=chunk,
            keep=("features",),
            out={"features": embedding},
            progress=_progress(config, workdir, "score/embedding", len(queries), chunk),
        )
        knn_lib.normalize_rows(embedding, ext.normalize)  # in place: the file holds what the kNN searched
        embedding.flush()
        query_chunk = max(chunk // mesh.size, 1) * mesh.size
        engine = knn_lib.knn_engine(mesh, ext.engine)
        log.info("[score] kNN engine: %s (scoring.extrapolation.engine=%r)", engine, ext.engine)
        extrapolated = knn_lib.extrapolate_knn(
            embedding,
            ref_features,
            values[~holdout],
            k=ext.k,
            metric=ext.metric,
            weighting=ext.weighting,
            query_chunk=query_chunk,
            mesh=mesh,
            engine=engine,
            progress=_progress(config, workdir, "score/knn", len(queries), query_chunk),
        )
        del embedding
    full = np.full(len(data.pool), np.nan, np.float32)
    full[queries] = extrapolated
    full[refs] = values[~holdout]  # reference rows keep their computed score
    position = np.searchsorted(queries, scored[holdout])
    rho = float(spearmanr(extrapolated[position], values[holdout]).statistic) if holdout.sum() > 2 else float("nan")
    log.info(
        "[score] extrapolated to %d rows from %d references (k=%d, %s); Spearman on %d held-out scored rows: %.3f",
        len(queries),
        len(refs),
        ext.k,
        ext.metric,
        int(holdout.sum()),
        rho,
    )
    return full, {
        "references": int(len(refs)),
        "held_out": int(holdout.sum()),
        "spearman_held_out": rho,
        "knn_engine_used": engine,
        "embedding": ext.embedding_from or "scoring model",
        "embedding_dim": int(ref_features.shape[1]),
        **ext.to_dict(),
    }
