"""Score phase: a score for every trainable pool row -> scores/<score>.npy (+ extras), scores/meta.json.

Scores that need a model train one (or `num_models` for el2n / grand) on the
scored rows; with scoring.extrapolation.enabled the scored rows are a subset and
every other row gets the mean score of its k nearest scored rows in the scoring
model's penultimate-feature space (Nieth et al.).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
from scipy.stats import spearmanr

from jax_advprune import parallel, storage
from jax_advprune import workdir as workdir_lib
from jax_advprune.data.sources import Pool
from jax_advprune.data.splits import Data
from jax_advprune.metrics import Progress
from jax_advprune.phases.common import apply_fn, build_model, features_fn, section
from jax_advprune.phases.train import batch_plan, train_model
from jax_advprune.pruning import importance, margins, predictions
from jax_advprune.pruning import knn as knn_lib

log = logging.getLogger("jax_advprune")

NAME = "score"
HISTORY_SCORES = ("forgetting", "du", "fp")


def settings(config) -> dict:
    return section(config, "data", "model", "attack", "train", "scoring", drop=("epochs",)) | {"seed": config.seed}


def needed(config) -> bool:
    """Random pruning ranks nothing: the phase is skipped."""
    return config.pruning.strategy != "random"


def has_outputs(workdir: str) -> bool:
    return any(storage.exists(os.path.join(workdir, d)) for d in ("scores", "scoring_model"))


class HistoryRecorder:
    """Records, every `every` steps (an epoch), the true-class probability and correctness of the scored
    samples under the training model (raw weights; clean or PGD inputs), one file per epoch.

    Files are written atomically and an existing epoch is not recomputed, so a
    resumed run completes the same history. `load()` -> (p_true (E, M), correct (E, M)).
    """

    def __init__(self, predict, pool: Pool, indices: np.ndarray, *, every: int, out_dir: str, chunk_size: int, seed: int):
        self.predict, self.pool, self.indices, self.every = predict, pool, indices, every
        self.out_dir, self.chunk_size, self.seed = out_dir, chunk_size, seed
        storage.makedirs(out_dir)
        parallel.sync("history listed")
        # Decided once, so every process of a multi-host run records the same epochs.
        self.recorded = {f for f in storage.listdir(out_dir) if f.startswith("epoch_") and ".tmp" not in f}

    def _path(self, epoch: int) -> str:
        return os.path.join(self.out_dir, f"epoch_{epoch:05d}.npz")

    def __call__(self, state, step: int) -> None:
        if step % self.every or os.path.basename(self._path(step // self.every)) in self.recorded:
            return
        out = predictions.pool_outputs(self.predict, state.variables(), self.pool, self.indices, chunk_size=self.chunk_size,
                                       seed=self.seed + step, keep=("probs",))
        p_true = predictions.true_class_probability(out["probs"], out["labels"])
        workdir_lib.save_npz(self._path(step // self.every), p_true=p_true, correct=np.argmax(out["probs"], axis=1) == out["labels"])

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        parallel.sync("history written")
        files = sorted(f for f in storage.listdir(self.out_dir) if f.startswith("epoch_") and f.endswith(".npz") and ".tmp" not in f)
        records = [storage.load_npz(os.path.join(self.out_dir, f)) for f in files]
        return np.stack([r["p_true"] for r in records]), np.stack([r["correct"] for r in records])


def scored_indices(config, data: Data) -> np.ndarray:
    """Pool rows that get a computed score: every trainable row, or with extrapolation the trainable
    originals plus `scoring.extrapolation.subset_size` synthetic rows drawn with its seed."""
    ext = config.scoring.extrapolation
    if not ext.enabled:
        return np.flatnonzero(data.trainable)
    synthetic = np.flatnonzero(data.trainable & data.pool.is_synthetic)
    subset = np.random.default_rng([ext.seed, 13]).choice(synthetic, ext.subset_size, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(data.trainable & ~data.pool.is_synthetic), subset]))


def run(config, workdir: str, data: Data, mesh, initial: dict | None = None) -> None:
    """Computes config.scoring.score for the pool -> scores/<score>.npy (+ extras) and scores/meta.json.

    initial: the scoring model's variables (scoring.init_from); without them one
    (or scoring.num_models) is trained on the scored rows.
    """
    out_dir = os.path.join(workdir, "scores")
    scfg = config.scoring
    if not needed(config):
        log.info("[score] not needed by strategy 'random', skipped")
        return
    if storage.exists(os.path.join(out_dir, "meta.json")):
        log.info("[score] complete, skipped (%s)", out_dir)
        return
    workdir_lib.record_settings(workdir, NAME, settings(config))
    start = time.perf_counter()
    n = len(data.pool)
    scored = scored_indices(config, data)
    meta = {"score": scfg.score, "seed": config.seed + 1, "scored": len(scored), "num_samples": n, "weights": "ema" if scfg.use_ema else "raw",
            "settings": scfg.to_dict()}
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
    for name, array in extras.items():
        whole = np.zeros(n, array.dtype)
        whole[scored] = array
        workdir_lib.save_npy(os.path.join(out_dir, f"{name}.npy"), whole)
    workdir_lib.save_npy(os.path.join(out_dir, f"{scfg.score}.npy"), full)
    finite = full[np.isfinite(full)]
    meta.update(seconds=time.perf_counter() - start, quantiles={str(q): float(np.quantile(finite, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)})
    if scfg.score == "margin":
        meta["fraction_correct"] = float((finite > 0).mean())
    workdir_lib.write_json(os.path.join(out_dir, "meta.json"), meta)
    log.info("[score] %s of %d samples (%d computed) in %.1fs, median %.4g", scfg.score, int(np.isfinite(full).sum()), len(scored), meta["seconds"], np.median(finite))


def _history_recorder(config, data: Data, mesh, scored: np.ndarray, predict, out_dir: str) -> HistoryRecorder:
    """Records the scored rows' true-class probability every epoch of the scoring run (clean or PGD inputs)."""
    scfg = config.scoring
    if scfg.history_inputs == "pgd":
        a = config.attack
        predict = predictions.Predictor(features_fn(build_model(config)), mesh=mesh,
                                        attack=dict(eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm))
    keep = np.zeros(len(data.pool), bool)
    keep[scored] = True
    return HistoryRecorder(predict, data.pool, scored, every=batch_plan(config, data, keep, seed=0).steps_per_epoch,
                           out_dir=os.path.join(out_dir, "history"), chunk_size=scfg.chunk_size, seed=config.seed + 1)


def _scoring_variables(config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, recorder, initial) -> list[dict]:
    """The scoring models' variables (EMA weights with scoring.use_ema): `initial`, or models trained on the `scored` rows."""
    scfg = config.scoring
    if initial is not None:
        meta["init_from"] = scfg.init_from
        return [initial]
    n = len(data.pool)
    keep = np.zeros(n, bool)
    keep[scored] = True
    base_eps = np.full(n, config.attack.eps, np.float32)
    variables = []
    for m in range(scfg.num_models if scfg.score in ("el2n", "grand") else 1):
        ckpt_dir = os.path.join(workdir, "scoring_model" if m == 0 else f"scoring_model_{m}", "checkpoints")
        _, state = train_model(config, data, mesh, keep, base_eps, epochs=scfg.train_epochs, ckpt_dir=ckpt_dir,
                               metrics_path=os.path.join(workdir, "metrics.jsonl"), phase="score/train" if m == 0 else f"score/train_{m}",
                               seed=config.seed + 1 + m, callbacks=() if recorder is None else (recorder,))
        meta.setdefault("model_checkpoints", []).append(os.path.join(ckpt_dir, str(int(state.step))))
        variables.append(state.variables(ema=scfg.use_ema))
    return variables


def _computed_scores(config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, predict: predictions.Predictor, initial):
    """Scores of the `scored` rows under the scoring model(s) -> (values (M,), extras, the last model's variables).

    Adds the checkpoints and score-specific facts to `meta`.
    """
    scfg = config.scoring
    recorder = _history_recorder(config, data, mesh, scored, predict, os.path.join(workdir, "scores")) if scfg.score in HISTORY_SCORES else None
    models = _scoring_variables(config, workdir, data, mesh, scored, meta, recorder, initial)
    extras = {}
    if scfg.score == "margin":
        values, extras = _margins(config, workdir, data, mesh, models[0], scored, meta)
    elif scfg.score in ("el2n", "grand"):
        keep = ("probs", "features") if scfg.score == "grand" else ("probs",)
        outputs = [predictions.pool_outputs(predict, v, data.pool, scored, chunk_size=scfg.chunk_size, keep=keep) for v in models]
        if scfg.score == "el2n":
            values = np.mean([importance.el2n(o["probs"], o["labels"]) for o in outputs], axis=0)
        else:
            values = np.mean([importance.grand_last_layer(o["probs"], o["labels"], o["features"]) for o in outputs], axis=0)
    else:
        p_true, correct = recorder.load()
        meta["history_epochs"] = int(p_true.shape[0])
        values = {"forgetting": lambda: importance.forgetting_events(correct), "fp": lambda: importance.frequency_score(p_true),
                  "du": lambda: importance.dynamic_uncertainty(p_true, window=scfg.du_window)}[scfg.score]()
    return values, extras, models[-1]


def _progress(config, workdir: str, phase: str, rows: int, chunk: int) -> Progress:
    """Progress over `rows` in chunks of `chunk` (rate, ETA), recorded in metrics.jsonl by process 0."""
    metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir_lib.is_writer() else None
    return Progress(phase, -(-rows // chunk), chunk, metrics_path, every_s=config.train.log_every_s)


def _margins(config, workdir: str, data: Data, mesh, variables: dict, scored: np.ndarray, meta: dict):
    """DeepFool margins of the scored rows under the scoring model -> (margins (M,), {'converged', 'n_iter'})."""
    scfg = config.scoring
    df = scfg.deepfool
    progress = _progress(config, workdir, "score/deepfool", len(scored), scfg.chunk_size)
    result = margins.margin_scores(apply_fn(build_model(config)), variables, data.pool, norm=df.norm, max_iter=df.max_iter, overshoot=df.overshoot,
                                   candidates=df.candidates or None, slots=scfg.slots, chunk_size=scfg.chunk_size, mesh=mesh,
                                   indices=scored, resume_dir=os.path.join(workdir, "scores", "deepfool_chunks"), progress=progress)
    progress.close()
    meta.update(deepfool=df.to_dict(), fraction_converged=float(result["converged"].mean()), mean_iterations=float(result["n_iter"].mean()))
    return result["margin"], {"converged": result["converged"], "n_iter": result["n_iter"]}


def _extrapolate(config, workdir: str, data: Data, mesh, predict: predictions.Predictor, variables: dict, scored: np.ndarray, values: np.ndarray):
    """Fills every trainable row's score from its k nearest scored rows -> (scores (N,), report).

    A `holdout_fraction` of the scored rows is left out of the references and
    extrapolated too: the Spearman correlation there measures the extrapolation.
    """
    ext = config.scoring.extrapolation
    out_dir = os.path.join(workdir, "scores")
    holdout = np.random.default_rng([ext.seed, 17]).random(len(scored)) < ext.holdout_fraction
    refs = scored[~holdout]
    queries = np.flatnonzero(data.trainable)
    chunk = config.scoring.chunk_size
    ref_features = predictions.pool_outputs(predict, variables, data.pool, refs, chunk_size=chunk, keep=("features",))["features"]
    embedding_path = os.path.join(out_dir, "embedding.npy")  # (trainable rows, D): the queries' embedding, kept for inspection
    # Every process fills its own memory-mapped copy (beside the file, or in TMPDIR for a remote work dir); process 0 keeps its.
    keep_copy = workdir_lib.atomic_output if workdir_lib.is_writer() else storage.scratch_file
    with keep_copy(embedding_path, f".{jax.process_index()}.npy") as tmp_path:
        embedding = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=(len(queries), ref_features.shape[1]))
        predictions.pool_outputs(predict, variables, data.pool, queries, chunk_size=chunk, keep=("features",), out={"features": embedding},
                                 progress=_progress(config, workdir, "score/embedding", len(queries), chunk))
        embedding.flush()
        query_chunk = max(chunk // mesh.size, 1) * mesh.size
        engine = knn_lib.knn_engine(mesh, ext.engine)
        log.info("[score] kNN engine: %s (scoring.extrapolation.engine=%r)", engine, ext.engine)
        extrapolated = knn_lib.extrapolate_knn(embedding, ref_features, values[~holdout], k=ext.k, metric=ext.metric, weighting=ext.weighting,
                                               query_chunk=query_chunk, mesh=mesh, engine=engine,
                                               progress=_progress(config, workdir, "score/knn", len(queries), query_chunk))
        del embedding
    full = np.full(len(data.pool), np.nan, np.float32)
    full[queries] = extrapolated
    full[refs] = values[~holdout]  # reference rows keep their computed score
    position = np.searchsorted(queries, scored[holdout])
    rho = float(spearmanr(extrapolated[position], values[holdout]).statistic) if holdout.sum() > 2 else float("nan")
    log.info("[score] extrapolated to %d rows from %d references (k=%d, %s); Spearman on %d held-out scored rows: %.3f",
             len(queries), len(refs), ext.k, ext.metric, int(holdout.sum()), rho)
    return full, {"references": int(len(refs)), "held_out": int(holdout.sum()), "spearman_held_out": rho, "knn_engine_used": engine, **ext.to_dict()}
