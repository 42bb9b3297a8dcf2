"""The four phases of a run: score -> select -> train -> evaluate.

Each phase reads its inputs from and writes its outputs to the work directory,
is skipped when its outputs are complete, and refuses to run over outputs that
were made with other settings (`settings/<phase>.json` records them), so nothing
a previous run wrote is ever overwritten. Outputs are written to temporary names
and renamed, with the phase's `meta.json` last: a phase cut off half-way is
simply run again (training resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.stats import spearmanr

from jax_advprune import parallel, training
from jax_advprune.checkpoint import Checkpointer, abstract_like
from jax_advprune.data.cifar import convert_cifar_tarball
from jax_advprune.data.generate import write_embedded_default
from jax_advprune.data.make_pool import write_generated_dataset
from jax_advprune.data.loader import BatchReader, batch_iterator, make_plan
from jax_advprune.data.sources import NpzPart, Pool, open_pool
from jax_advprune.evaluation import autoattack_lite_evaluator, pgd_evaluator
from jax_advprune.kernels import onednn
from jax_advprune.metrics import Progress
from jax_advprune.models import create_model
from jax_advprune.pruning import importance, predictions
from jax_advprune.pruning import knn as knn_lib
from jax_advprune.pruning import scores as scores_lib
from jax_advprune.pruning import strategies

log = logging.getLogger("jax_advprune")


class SettingsMismatchError(RuntimeError):
    """The work directory holds outputs of a phase made with other settings."""


# --------------------------------------------------------------------------- files


def _is_writer() -> bool:
    """Process 0 writes logs, metrics and files; every process computes."""
    return jax.process_index() == 0


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file, then rename); only process 0 of a multi-host run writes."""
    if not _is_writer():
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    os.replace(path + ".tmp", path)


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_npy(path: str, array: np.ndarray) -> None:
    """Saves an .npy atomically; only process 0 of a multi-host run writes."""
    if not _is_writer():
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    os.replace(path + ".tmp", path)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def guard_settings(workdir: str, phase: str, settings: dict) -> None:
    """Records `settings` for `phase`, or checks them against the recorded ones.

    Raises SettingsMismatchError naming every key that differs.
    """
    path = os.path.join(workdir, "settings", f"{phase}.json")
    settings = json.loads(json.dumps(settings, default=_jsonable))
    if not os.path.exists(path):
        write_json(path, settings)
        return
    with open(path) as f:
        recorded = json.load(f)
    old, new = _flatten(recorded), _flatten(settings)
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise SettingsMismatchError(
            f"{workdir} already holds '{phase}' outputs made with other settings ({path}):\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir (nothing is overwritten)."
        )


# Fields that change how a run reports, not what it computes: free to change on a rerun.
OPERATIONAL_FIELDS = ("log_every_s", "log_every_steps", "checkpoint_every", "keep_checkpoints")


def _section(config: ml_collections.ConfigDict, *names: str, drop: tuple[str, ...] = ()) -> dict:
    """The settings of config sections `names` that decide a phase's outputs."""
    out = {name: config[name].to_dict() if hasattr(config[name], "to_dict") else config[name] for name in names}
    for section in out.values():
        if isinstance(section, dict):
            for field in OPERATIONAL_FIELDS + drop:
                section.pop(field, None)
    return out


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """The pool (memory-mapped) and the test split (in memory, uint8 NHWC)."""

    pool: Pool
    test_images: np.ndarray
    test_labels: np.ndarray


DATA_SOURCES = ("digits", "npz", "cifar_tarball", "tfds", "generated")


def _prepared_once(what: str, prepare):
    """Runs `prepare` (which writes files once and returns their paths) on process 0, waits for it,
    then on every process, where it finds the files complete and only returns the paths."""
    if _is_writer():
        prepare()
    parallel.sync(f"{what} written")
    return prepare()


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Opens the pool `[original training split ; config.data.synthetic parts]` and the test split.

    config.data.name picks the original and test splits: 'digits' writes the
    embedded default into <workdir>/data once (its generated pool comes first
    among the synthetic parts); 'npz' reads user files in the DM-Improves-AT
    format; 'cifar_tarball' converts the official CIFAR-10/100 python tarball
    into npz files once (in data.cache_dir, default <workdir>/data); 'tfds' reads
    a prepared TFDS data set through tfds.data_source; 'generated' writes a
    class-pattern data set of data.generated_sizes (train, test, synthetic) into
    <workdir>/data once (smoke runs of the paper configs, offline).
    """
    cfg = config.data
    synthetic = list(cfg.synthetic)
    data_dir = os.path.join(workdir, "data")
    if cfg.name == "digits":
        paths = _prepared_once("embedded default", lambda: write_embedded_default(
            data_dir, image_size=cfg.image_size, synthetic_size=cfg.synthetic_size, test_fraction=cfg.test_fraction, seed=cfg.seed,
        ))
        synthetic = [paths["synthetic"]] + synthetic
    elif cfg.name == "npz":
        paths = {"train": cfg.original, "test": cfg.test}
    elif cfg.name == "cifar_tarball":
        paths = _prepared_once("CIFAR conversion", lambda: convert_cifar_tarball(cfg.tarball, cfg.cache_dir or data_dir))
        if paths["num_classes"] != cfg.num_classes:
            raise ValueError(f"{cfg.tarball} is {paths['name']} ({paths['num_classes']} classes) but data.num_classes is {cfg.num_classes}")
    elif cfg.name == "generated":
        paths = _prepared_once("generated data", lambda: write_generated_dataset(
            data_dir, train=cfg.generated_sizes[0], test=cfg.generated_sizes[1], synthetic=cfg.generated_sizes[2],
            image_shape=tuple(cfg.generated_image_shape), num_classes=cfg.num_classes, seed=cfg.seed,
        ))
        synthetic = [paths["synthetic"]] + synthetic
    elif cfg.name == "tfds":
        from jax_advprune.data.tfds_source import TfdsPart

        original = TfdsPart(cfg.tfds_name, "train", cfg.tfds_data_dir, cfg.num_classes)
        test = TfdsPart(cfg.tfds_name, "test", cfg.tfds_data_dir, cfg.num_classes)
    else:
        raise ValueError(f"config.data.name must be one of {DATA_SOURCES}, got {cfg.name!r}")
    if cfg.name != "tfds":
        original, test = NpzPart(paths["train"], cfg.num_classes), NpzPart(paths["test"], cfg.num_classes)
    pool = open_pool(original, synthetic, cfg.num_classes)
    test_images, test_labels = test.read(np.arange(len(test)))
    if test_images.shape[1:] != pool.image_shape:
        raise ValueError(f"test split {test.name} has images of shape {test_images.shape[1:]}, the pool {pool.image_shape}")
    log.info("pool: %d original + %d synthetic images of shape %s; test: %d", pool.num_original, len(pool) - pool.num_original, pool.image_shape, len(test_labels))
    return Data(pool, test_images, test_labels)


# --------------------------------------------------------------------------- training (shared by score and train)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, compute_dtype: str = "float32"):
    """The configured model; `compute_dtype` 'bfloat16' computes in bf16 with float32 parameters."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    kwargs = config.model.kwargs.to_dict()
    return create_model(config.model.name, num_classes=config.data.num_classes, dtype=COMPUTE_DTYPES[compute_dtype], **kwargs)


def validation_indices(num_original: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices (size,) of the held-out slice of the original training split, fixed by `seed`."""
    if not 0 <= size < num_original:
        raise ValueError(f"train.validation_size ({size}) must be in [0, {num_original}), the original split's size")
    return np.sort(np.random.default_rng([seed, 7]).choice(num_original, size, replace=False))


def trainable_mask(config, data: Data) -> np.ndarray:
    """(N,) bool: every pool row except the validation slice, which is never trained on, scored or selected."""
    trainable = np.ones(len(data.pool), bool)
    trainable[validation_indices(data.pool.num_original, config.train.validation_size, config.seed)] = False
    return trainable


def _train_model(config, data: Data, mesh, keep: np.ndarray, eps: np.ndarray, *, epochs: float, ckpt_dir: str, metrics_path: str, phase: str, seed: int,
                 callbacks: tuple = ()):
    """Adversarial training (config.train.loss) of a fresh model on the kept pool with per-sample eps.

    Resumes from ckpt_dir. The validation slice (config.train.validation_size
    originals, fixed by config.seed) is never trained on; with it, robust accuracy
    on that slice picks the best checkpoint, kept in `<ckpt_dir>_best`.
    Returns (model with float32 compute, final TrainState).
    """
    tcfg = config.train
    model = build_model(config, tcfg.compute_dtype)
    trainable = trainable_mask(config, data)
    held_out = np.flatnonzero(~trainable)  # the validation slice
    keep = keep & trainable
    plan = make_plan(
        keep, data.pool.num_original, batch_size=tcfg.batch_size,
        original_fraction=tcfg.original_fraction if tcfg.original_fraction > 0 else None,
        synthetic_with_replacement=tcfg.synthetic_with_replacement, seed=seed,
    )
    num_steps = max(1, int(np.ceil(epochs * plan.steps_per_epoch)))
    tx = training.make_optimizer(tcfg, num_steps)
    eval_model = build_model(config)
    state = training.init_train_state(model, tx, data.pool.image_shape, seed)
    reader = BatchReader(
        data.pool, plan, eps, crop_padding=tcfg.crop_padding, flip=tcfg.flip,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    batches = batch_iterator(reader, num_steps, num_workers=tcfg.num_workers)
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=tcfg.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state), batches)
        if int(state.step) >= num_steps:
            log.info("[%s] complete, skipped (checkpoint step %d in %s)", phase, int(state.step), ckpt_dir)
            checkpointer.close()
            return eval_model, state
        log.info("[%s] resumed from %s at step %d", phase, ckpt_dir, int(state.step))
    log.info(
        "[%s] %s, %d steps (%.3g epochs of %d steps), batch %d, %d kept samples, %d held out for validation, %s compute",
        phase, tcfg.loss, num_steps, epochs, plan.steps_per_epoch, tcfg.batch_size, int(keep.sum()), len(held_out), tcfg.compute_dtype,
    )
    train_step = training.make_train_step(model, tx, tcfg, config.attack, mesh, schedule=training.make_schedule(tcfg, num_steps))
    workdir_tb = os.path.join(os.path.dirname(metrics_path), "tensorboard", phase.replace("/", "_"))
    progress = Progress(
        phase, num_steps, tcfg.batch_size, metrics_path if _is_writer() else None, every_s=tcfg.log_every_s,
        first_step=int(state.step), tensorboard_dir=workdir_tb if _is_writer() else None,
    )
    validation = None
    if len(held_out):
        val_images, val_labels = data.pool.read(held_out)
        evaluate = pgd_evaluator(
            _apply_fn(eval_model), eps=config.attack.eps, step_size=config.attack.eps * config.eval.step_fraction,
            steps=tcfg.validation_pgd_steps, norm=config.attack.norm, batch_size=config.eval.batch_size, mesh=mesh,
        )
        validation = training.Validation(
            evaluate=lambda variables: evaluate(variables, val_images, val_labels, seed),
            every=max(1, int(round(tcfg.validation_every_epochs * plan.steps_per_epoch))),
            checkpointer=best_checkpointer(ckpt_dir),
        )
    try:
        state = training.fit(
            state, train_step, batches, num_steps=num_steps, checkpointer=checkpointer,
            checkpoint_every=tcfg.checkpoint_every, progress=progress, log_every_steps=tcfg.log_every_steps,
            validation=validation, callbacks=callbacks,
        )
        if validation is not None:
            log.info("[%s] best validation checkpoint: step %s in %s", phase, validation.checkpointer.best_step(), validation.checkpointer.directory)
    finally:
        checkpointer.close()
        progress.close()
        if validation is not None:
            validation.checkpointer.close()
    return eval_model, state


def best_checkpoint_dir(ckpt_dir: str) -> str:
    """Where a training run's best-validation checkpoint lives, next to its checkpoint directory."""
    return ckpt_dir + "_best"


def best_checkpointer(ckpt_dir: str) -> Checkpointer:
    """The best-validation checkpoint of a training run: the save with the highest validation PGD accuracy."""
    return Checkpointer(best_checkpoint_dir(ckpt_dir), max_to_keep=1, best_metric="pgd_accuracy")


def final_checkpoint_dir(workdir: str) -> str:
    """Checkpoints of the train phase (the final model; scoring models have their own)."""
    return os.path.join(workdir, "checkpoints")


def _apply_fn(model):
    return lambda variables, x: model.apply(variables, x, train=False)


# --------------------------------------------------------------------------- phases


class HistoryRecorder:
    """Records, every `every` steps (an epoch), the true-class probability and correctness of the scored
    samples under the training model (raw weights; clean or PGD inputs), one file per epoch.

    Files are written atomically and an existing epoch is not recomputed, so a
    resumed run completes the same history. `load()` -> (p_true (E, M), correct (E, M)).
    """

    def __init__(self, predict, pool: Pool, indices: np.ndarray, *, every: int, out_dir: str, chunk_size: int, seed: int):
        self.predict, self.pool, self.indices, self.every = predict, pool, indices, every
        self.out_dir, self.chunk_size, self.seed = out_dir, chunk_size, seed
        os.makedirs(out_dir, exist_ok=True)
        parallel.sync("history listed")
        # Decided once, so every process of a multi-host run records the same epochs.
        self.recorded = {f for f in os.listdir(out_dir) if f.startswith("epoch_") and ".tmp" not in f}

    def _path(self, epoch: int) -> str:
        return os.path.join(self.out_dir, f"epoch_{epoch:05d}.npz")

    def __call__(self, state, step: int) -> None:
        if step % self.every or os.path.basename(self._path(step // self.every)) in self.recorded:
            return
        out = predictions.pool_outputs(self.predict, state.variables(), self.pool, self.indices, chunk_size=self.chunk_size,
                                       seed=self.seed + step, keep=("probs",))
        p_true = predictions.true_class_probability(out["probs"], out["labels"])
        if _is_writer():
            path = self._path(step // self.every)
            np.savez(path + ".tmp.npz", p_true=p_true, correct=np.argmax(out["probs"], axis=1) == out["labels"])
            os.replace(path + ".tmp.npz", path)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        parallel.sync("history written")
        files = sorted(f for f in os.listdir(self.out_dir) if f.startswith("epoch_") and f.endswith(".npz") and ".tmp" not in f)
        records = [np.load(os.path.join(self.out_dir, f)) for f in files]
        return np.stack([r["p_true"] for r in records]), np.stack([r["correct"] for r in records])


def scored_indices(config, data: Data, trainable: np.ndarray) -> np.ndarray:
    """Pool rows that get a computed score: every trainable row, or with extrapolation the trainable
    originals plus `scoring.extrapolation.subset_size` synthetic rows drawn with its seed."""
    ext = config.scoring.extrapolation
    if not ext.enabled:
        return np.flatnonzero(trainable)
    synthetic = np.flatnonzero(trainable & data.pool.is_synthetic)
    if not 0 < ext.subset_size <= len(synthetic):
        raise ValueError(f"scoring.extrapolation.subset_size must be in [1, {len(synthetic)}] (the synthetic pool), got {ext.subset_size}")
    subset = np.random.default_rng([ext.seed, 13]).choice(synthetic, ext.subset_size, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(trainable & ~data.pool.is_synthetic), subset]))


def _features_fn(model):
    return lambda variables, x: model.apply(variables, x, train=False, return_features=True)


def score(config, workdir: str, data: Data, mesh) -> None:
    """Computes config.scoring.score for the pool -> scores/<score>.npy (+ extras) and scores/meta.json.

    Scores that need a model train one (or `num_models` for el2n / grand) on the
    scored rows; with scoring.extrapolation.enabled the scored rows are a subset
    and every other row gets the mean score of its k nearest scored rows in the
    scoring model's penultimate-feature space (Nieth et al.).
    """
    out_dir = os.path.join(workdir, "scores")
    scfg = config.scoring
    if config.pruning.strategy == "random":
        log.info("[score] not needed by strategy 'random', skipped")
        return
    if scfg.score not in importance.SCORES:
        raise ValueError(f"scoring.score must be one of {importance.SCORES}, got {scfg.score!r}")
    guard_settings(workdir, "score", _section(config, "data", "model", "attack", "train", "scoring", drop=("epochs",)) | {"seed": config.seed})
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        log.info("[score] complete, skipped (%s)", out_dir)
        return
    start = time.perf_counter()
    n = len(data.pool)
    trainable = trainable_mask(config, data)
    scored = scored_indices(config, data, trainable)
    meta = {"score": scfg.score, "seed": config.seed + 1, "scored": len(scored), "num_samples": n, "weights": "ema" if scfg.use_ema else "raw",
            "settings": scfg.to_dict()}
    extras: dict[str, np.ndarray] = {}
    # One compiled clean forward pass (probabilities, features) serves every scoring model and the embedding.
    predict = predictions.Predictor(_features_fn(build_model(config)), mesh=mesh)
    if scfg.score == "random":
        values = importance.random_scores(len(scored), config.seed)
        state = None
    else:
        values, extras, state = _computed_scores(config, workdir, data, mesh, scored, meta, predict)
    full = np.full(n, np.nan, np.float32)  # rows without a score (the validation slice) stay NaN
    full[scored] = values
    if scfg.extrapolation.enabled:
        full, meta["extrapolation"] = _extrapolate(config, data, mesh, predict, state, scored, values, trainable, out_dir)
    for name, array in extras.items():
        whole = np.zeros(n, array.dtype)
        whole[scored] = array
        save_npy(os.path.join(out_dir, f"{name}.npy"), whole)
    save_npy(os.path.join(out_dir, f"{scfg.score}.npy"), full)
    finite = full[np.isfinite(full)]
    meta.update(seconds=time.perf_counter() - start, quantiles={str(q): float(np.quantile(finite, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)})
    if scfg.score == "margin":
        meta["fraction_correct"] = float((finite > 0).mean())
    write_json(os.path.join(out_dir, "meta.json"), meta)
    log.info("[score] %s of %d samples (%d computed) in %.1fs, median %.4g", scfg.score, int(np.isfinite(full).sum()), len(scored), meta["seconds"], np.median(finite))


def _computed_scores(config, workdir: str, data: Data, mesh, scored: np.ndarray, meta: dict, predict: predictions.Predictor):
    """Trains the scoring model(s) on the `scored` rows and scores them -> (values (M,), extras, final state).

    Adds the checkpoints and score-specific facts to `meta`.
    """
    scfg = config.scoring
    out_dir = os.path.join(workdir, "scores")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    n = len(data.pool)
    extras: dict[str, np.ndarray] = {}
    keep = np.zeros(n, bool)
    keep[scored] = True
    base_eps = np.full(n, config.attack.eps, np.float32)
    history_scores = ("forgetting", "du", "fp")
    num_models = scfg.num_models if scfg.score in ("el2n", "grand") else 1
    outputs = []
    for m in range(num_models):
        ckpt_dir = os.path.join(workdir, "scoring_model" if m == 0 else f"scoring_model_{m}", "checkpoints")
        callbacks = ()
        if scfg.score in history_scores:
            attack = None
            if scfg.history_inputs == "pgd":
                a = config.attack
                attack = dict(eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm)
            elif scfg.history_inputs != "clean":
                raise ValueError(f"scoring.history_inputs must be 'clean' or 'pgd', got {scfg.history_inputs!r}")
            recorder = HistoryRecorder(
                predict if attack is None else predictions.Predictor(_features_fn(build_model(config)), mesh=mesh, attack=attack), data.pool, scored,
                every=_steps_per_epoch(config, data, keep), out_dir=os.path.join(out_dir, "history"),
                chunk_size=scfg.chunk_size, seed=config.seed + 1,
            )
            callbacks = (recorder,)
        model, state = _train_model(
            config, data, mesh, keep, base_eps, epochs=scfg.train_epochs, ckpt_dir=ckpt_dir, metrics_path=metrics_path,
            phase="score/train" if m == 0 else f"score/train_{m}", seed=config.seed + 1 + m, callbacks=callbacks,
        )
        meta.setdefault("model_checkpoints", []).append(os.path.join(ckpt_dir, str(int(state.step))))
        if scfg.score in ("el2n", "grand"):
            outputs.append(predictions.pool_outputs(predict, state.variables(ema=scfg.use_ema), data.pool, scored, chunk_size=scfg.chunk_size,
                                                    keep=("probs", "features") if scfg.score == "grand" else ("probs",)))
    if scfg.score == "margin":
        df = scfg.deepfool
        run = scores_lib.deepfool_runner(
            _apply_fn(model), slots=scfg.slots, norm=df.norm, max_iter=df.max_iter, overshoot=df.overshoot, candidates=df.candidates, mesh=mesh,
        )
        progress = Progress("score/deepfool", -(-len(scored) // scfg.chunk_size), scfg.chunk_size, metrics_path if _is_writer() else None, every_s=config.train.log_every_s)
        parallel.sync("before DeepFool chunks are listed")
        result = scores_lib.margin_scores(run, state.variables(ema=scfg.use_ema), data.pool, chunk_size=scfg.chunk_size, indices=scored,
                                          resume_dir=os.path.join(out_dir, "deepfool_chunks"), progress=progress)
        values, extras = result["margin"], {"converged": result["converged"], "n_iter": result["n_iter"]}
        meta.update(deepfool=df.to_dict(), fraction_converged=float(result["converged"].mean()), mean_iterations=float(result["n_iter"].mean()))
    elif scfg.score == "el2n":
        values = np.mean([importance.el2n(o["probs"], o["labels"]) for o in outputs], axis=0)
    elif scfg.score == "grand":
        values = np.mean([importance.grand_last_layer(o["probs"], o["labels"], o["features"]) for o in outputs], axis=0)
    else:
        p_true, correct = recorder.load()
        meta["history_epochs"] = int(p_true.shape[0])
        if scfg.score == "forgetting":
            values = importance.forgetting_events(correct)
        elif scfg.score == "du":
            values = importance.dynamic_uncertainty(p_true, window=scfg.du_window)
        else:
            values = importance.frequency_score(p_true)
    return values, extras, state


def _steps_per_epoch(config, data: Data, keep: np.ndarray) -> int:
    tcfg = config.train
    plan = make_plan(keep, data.pool.num_original, batch_size=tcfg.batch_size,
                     original_fraction=tcfg.original_fraction if tcfg.original_fraction > 0 else None,
                     synthetic_with_replacement=tcfg.synthetic_with_replacement, seed=0)
    return plan.steps_per_epoch


def _extrapolate(config, data: Data, mesh, predict: predictions.Predictor, state, scored: np.ndarray, values: np.ndarray,
                 trainable: np.ndarray, out_dir: str):
    """Fills every trainable row's score from its k nearest scored rows -> (scores (N,), report).

    A `holdout_fraction` of the scored rows is left out of the references and
    extrapolated too: the Spearman correlation there measures the extrapolation.
    """
    ext = config.scoring.extrapolation
    if state is None:
        raise ValueError("extrapolation embeds with the scoring model; scoring.score='random' has none")
    n = len(data.pool)
    rng = np.random.default_rng([ext.seed, 17])
    holdout = rng.random(len(scored)) < ext.holdout_fraction
    refs = scored[~holdout]
    variables = state.variables(ema=config.scoring.use_ema)
    queries = np.flatnonzero(trainable)
    chunk = config.scoring.chunk_size
    ref_features = predictions.pool_outputs(predict, variables, data.pool, refs, chunk_size=chunk, keep=("features",))["features"]
    embedding_path = os.path.join(out_dir, "embedding.npy")
    os.makedirs(out_dir, exist_ok=True)
    tmp_path = embedding_path + f".tmp{jax.process_index()}.npy"  # every process fills its own copy
    embedding = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=(len(queries), ref_features.shape[1]))
    predictions.pool_outputs(predict, variables, data.pool, queries, chunk_size=chunk, keep=("features",), out={"features": embedding})
    embedding.flush()
    query_chunk = max(chunk // mesh.size, 1) * mesh.size
    dist, idx = knn_lib.knn(embedding, ref_features, k=ext.k, metric=ext.metric, query_chunk=query_chunk, mesh=mesh)
    del embedding
    if _is_writer():
        os.replace(tmp_path, embedding_path)  # (trainable rows, D): the queries' embedding, kept for inspection
    else:
        os.remove(tmp_path)
    extrapolated = knn_lib.extrapolate(values[~holdout], dist, idx, ext.weighting)
    full = np.full(n, np.nan, np.float32)
    full[queries] = extrapolated
    full[refs] = values[~holdout]  # reference rows keep their computed score
    position = np.searchsorted(queries, scored[holdout])
    rho = float(spearmanr(extrapolated[position], values[holdout]).statistic) if holdout.sum() > 2 else float("nan")
    log.info("[score] extrapolated to %d rows from %d references (k=%d, %s); Spearman on %d held-out scored rows: %.3f",
             len(queries), len(refs), ext.k, ext.metric, int(holdout.sum()), rho)
    return full, {"references": int(len(refs)), "held_out": int(holdout.sum()), "spearman_held_out": rho, **ext.to_dict()}


def select(config, workdir: str, data: Data) -> None:
    """Applies the pruning strategy to the scores -> selection/keep.npy, eps.npy, meta.json."""
    out_dir = os.path.join(workdir, "selection")
    guard_settings(workdir, "select", _section(config, "pruning") | {"eps": config.attack.eps, "seed": config.seed, "validation_size": config.train.validation_size, "score": config.scoring.score})
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        log.info("[select] complete, skipped (%s)", out_dir)
        return
    pcfg = config.pruning
    score_name = config.scoring.score
    scores = None if pcfg.strategy == "random" else np.load(os.path.join(workdir, "scores", f"{score_name}.npy"))
    if pcfg.strategy in ("puma", "prune_easy", "prune_hard") and score_name != "margin":
        raise ValueError(f"pruning.strategy {pcfg.strategy!r} ranks DeepFool margins, but scoring.score is {score_name!r}; "
                         "use keep_top / keep_bottom for other scores")
    if pcfg.strategy == "puma" and config.scoring.deepfool.norm != config.attack.norm:
        raise ValueError(
            f"puma compares margins with the training eps, so scoring.deepfool.norm ({config.scoring.deepfool.norm}) "
            f"must equal attack.norm ({config.attack.norm})"
        )
    labels = data.pool.labels()
    scopes = {"all": np.ones(len(labels), bool), "synthetic": data.pool.is_synthetic}
    if pcfg.scope not in scopes:
        raise ValueError(f"pruning.scope must be one of {sorted(scopes)}, got {pcfg.scope!r}")
    trainable = trainable_mask(config, data)  # select among the rows outside the validation slice
    keep_sub, eps_sub = strategies.select(
        pcfg.strategy, scores=None if scores is None else scores[trainable], labels=labels[trainable], prunable=scopes[pcfg.scope][trainable],
        keep_ratio=pcfg.keep_ratio, base_eps=config.attack.eps, class_balanced=pcfg.class_balanced, seed=config.seed,
        puma=pcfg.puma.to_dict(),
    )
    keep = np.zeros(len(labels), bool)
    eps = np.full(len(labels), config.attack.eps, np.float32)
    keep[trainable], eps[trainable] = keep_sub, eps_sub
    save_npy(os.path.join(out_dir, "keep.npy"), keep)
    save_npy(os.path.join(out_dir, "eps.npy"), eps)
    synthetic = data.pool.is_synthetic
    meta = {
        "strategy": pcfg.strategy,
        "settings": pcfg.to_dict(),
        "kept": int(keep.sum()),
        "kept_original": int((keep & ~synthetic).sum()),
        "kept_synthetic": int((keep & synthetic).sum()),
        "pool_size": len(keep),
        "held_out_for_validation": int((~trainable).sum()),
        "kept_per_class": np.bincount(labels[keep], minlength=config.data.num_classes).tolist(),
        "lowered_eps": int((keep & (eps < config.attack.eps)).sum()),
        "mean_eps_kept": float(eps[keep].mean()) if keep.any() else 0.0,
    }
    write_json(os.path.join(out_dir, "meta.json"), meta)
    log.info("[select] %s kept %d / %d (%d original, %d synthetic), %d with lowered eps", pcfg.strategy, meta["kept"], len(keep), meta["kept_original"], meta["kept_synthetic"], meta["lowered_eps"])


def _load_selection(workdir: str, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.load(os.path.join(workdir, "selection", "keep.npy"))
    eps = np.load(os.path.join(workdir, "selection", "eps.npy"))
    for name, array in (("keep.npy", keep), ("eps.npy", eps)):
        if array.shape != (pool_size,):
            raise ValueError(f"{os.path.join(workdir, 'selection', name)} has shape {array.shape}, expected ({pool_size},), one entry per pool sample")
    return keep.astype(bool), eps.astype(np.float32)


def train(config, workdir: str, data: Data, mesh):
    """Adversarial training (train.loss) of a fresh model on the selection; checkpoints/, metrics.jsonl; resumes."""
    guard_settings(workdir, "train", _section(config, "data", "model", "attack", "train", "pruning") | {"seed": config.seed})
    keep, eps = _load_selection(workdir, len(data.pool))
    return _train_model(
        config, data, mesh, keep, eps, epochs=config.train.epochs, ckpt_dir=final_checkpoint_dir(workdir),
        metrics_path=os.path.join(workdir, "metrics.jsonl"), phase="train", seed=config.seed,
    )


def evaluate(config, workdir: str, data: Data, mesh, model, state) -> None:
    """Clean, PGD and APGD (autoattack_lite) accuracy on the test split of the final raw and EMA weights,
    and of the EMA weights of the best-validation checkpoint (`checkpoints_best/`, what the reference reports).

    Writes results.json and report.md.
    """
    guard_settings(workdir, "evaluate", _section(config, "eval") | {"eps": config.attack.eps, "norm": config.attack.norm})
    if os.path.exists(os.path.join(workdir, "results.json")):
        log.info("[evaluate] complete, skipped (%s)", os.path.join(workdir, "results.json"))
        return
    ecfg = config.eval
    common = dict(eps=config.attack.eps, norm=config.attack.norm, batch_size=ecfg.batch_size, mesh=mesh)
    evaluators = [pgd_evaluator(_apply_fn(model), step_size=config.attack.eps * ecfg.step_fraction, steps=ecfg.pgd_steps, **common)]
    if ecfg.apgd_steps > 0:
        evaluators.append(autoattack_lite_evaluator(_apply_fn(model), steps=ecfg.apgd_steps, num_targets=ecfg.apgd_targets, **common))
    candidates = {"raw": state.variables(), "ema": state.variables(ema=True)}
    best_state, best_step = best_validation_state(workdir, state)
    if best_state is not None:
        candidates["best_ema"] = best_state.variables(ema=True)
    results = {}
    for weights, variables in candidates.items():  # the same compiled evaluators for every set of weights
        results[weights] = {}
        for evaluate_fn in evaluators:
            results[weights].update(evaluate_fn(variables, data.test_images, data.test_labels, config.seed))
        log.info("[evaluate] %s weights: %s", weights, ", ".join(f"{k} {v:.4f}" for k, v in results[weights].items() if k != "n"))
    with open(os.path.join(workdir, "selection", "meta.json")) as f:
        selection = json.load(f)
    summary = {
        "strategy": config.pruning.strategy,
        "keep_ratio": config.pruning.keep_ratio,
        "kept": selection["kept"],
        "pool_size": selection["pool_size"],
        "attack": {"norm": config.attack.norm, "eps": config.attack.eps, "pgd_steps": ecfg.pgd_steps},
        "checkpoint_step": int(state.step),
        "best_validation_step": best_step,
        "results": results,
    }
    headers = {"clean_accuracy": "clean", "pgd_accuracy": f"PGD-{ecfg.pgd_steps}", "apgd_ce_accuracy": "APGD-CE", "autoattack_lite_accuracy": "APGD-CE + APGD-T"}
    columns = [c for c in headers if c in results["raw"]]
    labels = {"raw": f"raw (step {int(state.step)})", "ema": f"EMA (step {int(state.step)})", "best_ema": f"EMA, best validation (step {best_step})"}
    lines = [
        f"# {os.path.basename(os.path.abspath(workdir))}: {config.pruning.strategy}, keep ratio {config.pruning.keep_ratio}",
        "",
        f"Kept {selection['kept']} of {selection['pool_size']} pool samples; {selection['lowered_eps']} trained with a lowered eps.",
        f"Test split: {len(data.test_labels)} images; {config.attack.norm} eps {config.attack.eps:.4g}; PGD-{ecfg.pgd_steps} (CE, random start); "
        f"APGD-CE then APGD-T ({ecfg.apgd_targets} targets) with {ecfg.apgd_steps} steps each, worst case per sample.",
        "",
        "| weights | " + " | ".join(f"{headers[c]} accuracy" for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ] + [f"| {labels[w]} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |" for w, r in results.items()]
    if _is_writer():
        with open(os.path.join(workdir, "report.md.tmp"), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(os.path.join(workdir, "report.md.tmp"), os.path.join(workdir, "report.md"))
    write_json(os.path.join(workdir, "results.json"), summary)


def best_validation_state(workdir: str, like):
    """(train state, step) of the best-validation checkpoint in <workdir>/checkpoints_best, or (None, None) without one.

    `like`: a train state whose structure and placement the restored one takes.
    """
    if not os.path.isdir(best_checkpoint_dir(final_checkpoint_dir(workdir))):
        return None, None
    checkpointer = best_checkpointer(final_checkpoint_dir(workdir))
    try:
        step = checkpointer.best_step()
        if step is None:
            return None, None
        return checkpointer.restore(abstract_like(like), step=step), int(step)
    finally:
        checkpointer.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs every phase whose outputs are missing."""
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(config.num_devices or None)
    log.info("devices: %d x %s (process %d of %d)", mesh.size, mesh.devices.flat[0].platform, jax.process_index(), jax.process_count())
    log.info("convolutions: %s", onednn.describe())
    data = load_data(config, workdir)
    score(config, workdir, data, mesh)
    parallel.sync("score written")
    select(config, workdir, data)
    parallel.sync("selection written")
    model, state = train(config, workdir, data, mesh)
    evaluate(config, workdir, data, mesh, model, state)
    log.info("done: %s", os.path.join(workdir, "report.md"))
