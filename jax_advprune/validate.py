"""Every setting and input of a run, checked before anything is written or computed.

`check_run` collects every problem at once -- the config's enumerations, ranges
and pairings, the model's keyword arguments, batch sizes against the device
mesh, the data files, and the work directory's recorded settings and input
fingerprints -- and raises one ConfigError listing them, each with the key, the
value and what is allowed. It reads file headers and small splits only.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax_advprune import backends, run_dir, storage
from jax_advprune.attacks.common import NORMS
from jax_advprune.attacks.deepfool import FORMS as DEEPFOOL_FORMS
from jax_advprune.data import splits
from jax_advprune.errors import UserError
from jax_advprune.models import MODELS, create_model
from jax_advprune.models.preact_resnet import ACTIVATIONS
from jax_advprune.phases import evaluate, score, select, train
from jax_advprune.pruning import importance, strategies
from jax_advprune.pruning.knn import ENGINES as KNN_ENGINES
from jax_advprune.pruning.knn import METRICS, NORMALIZATIONS
from jax_advprune.pruning.knn import faiss_available as knn_engine_available
from jax_advprune.training import SCHEDULES, TRAINING_LOSSES


class ConfigError(UserError):
    """One or more settings or inputs of a run are wrong; `problems` lists them."""

    def __init__(self, problems: list[str], source: str = "the config"):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) with {source}; nothing was computed or written:\n  - "
            + "\n  - ".join(problems)
        )


class _Problems(list):
    def need(self, ok: bool, key: str, value, allowed: str) -> bool:
        """Records 'key=value: allowed' unless `ok`; returns ok."""
        if not ok:
            self.append(f"{key}={value!r}: {allowed}")
        return ok

    def one_of(self, key: str, value, allowed) -> bool:
        return self.need(value in allowed, key, value, "one of " + ", ".join(map(str, allowed)))

    def within(self, key: str, value, low=None, high=None, *, low_open=False, high_open=False) -> bool:
        """low <= value <= high (strict where open), value a finite number."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = (
            ok
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))
        )
        left, right = (
            ("(" if low_open else "[") + ("-inf" if low is None else f"{low}"),
            ("inf" if high is None else f"{high}") + (")" if high_open else "]"),
        )
        return self.need(ok, key, value, f"a number in {left}, {right}")


def split_sizes(config) -> dict[str, int]:
    """Every size the run splits over the mesh's devices: {setting: size} (the valid ones; bad ones are reported elsewhere)."""
    keys = ["train.batch_size", "eval.batch_size"] + (
        ["scoring.slots", "scoring.chunk_size"] if score.needed(config) else []
    )
    sizes = {}
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            sizes[key] = value
    return sizes


def mesh_size(config, available_devices: int, *, process_count: int = 1, platform: str = "cpu") -> int:
    """Devices the run's mesh spans (over all processes).

    config.num_devices when set (0 < n <= available; otherwise refused by validation).
    With 0 (the default): on GPUs and TPUs every device; on the CPU, whose devices are
    virtual slices of one machine, the largest count, the same on every process, that
    divides every size the run splits over the mesh (`split_sizes`), so that any number
    of CPU devices (say 24 asked for by --cpu_devices, for batches of 256) runs: the
    mesh then spans 16 of them. Every device count gives the same results (the batch
    statistics and losses are reduced over the whole global batch).
    """
    if isinstance(config.num_devices, int) and 0 < config.num_devices <= available_devices:
        return config.num_devices
    if platform != "cpu":
        return available_devices
    common = math.gcd(*split_sizes(config).values()) or 1
    for per_process in range(available_devices // process_count, 0, -1):
        if common % (per_process * process_count) == 0:
            return per_process * process_count
    return available_devices  # nothing divides: validation names the sizes to change


def config_problems(config, *, available_devices: int, process_count: int, platform: str = "cpu") -> list[str]:
    """Every problem of the config alone (no files read), with `available_devices` devices of `platform`
    over `process_count` processes."""
    p = _Problems()
    if p.within("num_devices", config.num_devices, 0, available_devices) and config.num_devices:
        p.need(
            config.num_devices % process_count == 0,
            "num_devices",
            config.num_devices,
            f"0 (automatic) or a multiple of the {process_count} processes (each process contributes the same number of devices)",
        )
    num_devices = mesh_size(config, available_devices, process_count=process_count, platform=platform)
    p.one_of("data.name", config.data.name, splits.DATA_SOURCES)
    p.within("data.num_classes", config.data.num_classes, 2)
    _model_problems(p, config)
    _attack_and_train_problems(p, config, process_count)
    if score.needed(config):
        _scoring_problems(p, config)
    p.extend(
        strategies.problems(
            config.pruning.strategy,
            keep_ratio=config.pruning.keep_ratio,
            base_eps=config.attack.eps,
            score=config.scoring.score if config.pruning.strategy != "random" else None,
            score_norm=config.scoring.deepfool.norm,
            attack_norm=config.attack.norm,
            puma=config.pruning.puma.to_dict(),
        )
    )
    p.one_of("pruning.scope", config.pruning.scope, select.SCOPES)
    ecfg = config.eval
    p.within("eval.pgd_steps", ecfg.pgd_steps, 1)
    p.within("eval.step_fraction", ecfg.step_fraction, 0, low_open=True)
    p.one_of("eval.attack", ecfg.attack, evaluate.ATTACKS)
    p.within("eval.apgd_steps", ecfg.apgd_steps, 1)
    p.within("eval.apgd_targets", ecfg.apgd_targets, 1, config.data.num_classes - 1)
    p.within("eval.fab_steps", ecfg.fab_steps, 1)
    p.within("eval.square_queries", ecfg.square_queries, 1)
    p.within("eval.batch_size", ecfg.batch_size, 1)
    from jax_advprune.phases.weights import WEIGHTS

    weights = tuple(ecfg.get("weights", WEIGHTS))
    p.need(
        bool(weights) and set(weights) <= set(WEIGHTS),
        "eval.weights",
        weights,
        "a non-empty subset of " + ", ".join(WEIGHTS),
    )
    p.need(
        set(weights) != {"best_ema"} or config.train.validation_size > 0 or bool(ecfg.init_from),
        "eval.weights",
        weights,
        "more than 'best_ema' with train.validation_size=0 (no best-validation checkpoint is kept)",
    )
    held_out = ecfg.get("generated_test_size", 0)
    if p.need(
        isinstance(held_out, int) and not isinstance(held_out, bool),
        "eval.generated_test_size",
        held_out,
        "a whole number of images",
    ):
        p.within("eval.generated_test_size", held_out, 0)
        p.need(
            held_out == 0 or config.data.name == "digits",
            "eval.generated_test_size",
            held_out,
            f"0 with data.name={config.data.name!r} (a held-out generated split is drawn from the embedded default's "
            "generator, data.name='digits')",
        )
    for key, size in split_sizes(config).items():  # the sizes mesh_size chose the device count for
        p.need(size % num_devices == 0, key, size, f"a multiple of the {num_devices} devices of the mesh")
    return p


def _model_problems(p: _Problems, config) -> None:
    name, kwargs = config.model.name, config.model.kwargs.to_dict()
    if not p.one_of("model.name", name, sorted(MODELS)):
        return
    try:
        model = create_model(name, num_classes=config.data.num_classes, **kwargs)
    except TypeError as error:
        fields = sorted(
            f.name
            for f in dataclasses.fields(create_model(name))
            if f.name not in ("parent", "name", "num_classes", "dtype")
        )
        unknown = sorted(set(kwargs) - set(fields))
        p.append(
            f"model.kwargs={kwargs!r}: {', '.join(unknown) or error} not accepted by model {name!r}, whose settings are {', '.join(fields)}; "
            "model.kwargs belong to the config's model: use a config written for this model (configs/cifar10_trades.py uses wide_resnet) "
            "or set model.kwargs in a config file"
        )
        return
    if "activation" in kwargs:
        p.one_of("model.kwargs.activation", kwargs["activation"], sorted(ACTIVATIONS))
    if hasattr(model, "depth"):
        p.need(
            model.depth >= 10 and (model.depth - 4) % 6 == 0,
            "model.kwargs.depth",
            model.depth,
            "6n + 4 with n >= 1 (10, 16, 28, 34, 70, ...)",
        )


def _attack_and_train_problems(p: _Problems, config, process_count: int) -> None:
    a, t = config.attack, config.train
    p.one_of("attack.norm", a.norm, NORMS)
    if p.within("attack.eps", a.eps, 0, low_open=True) and a.norm == "linf":
        p.within("attack.eps", a.eps, 0, 1, low_open=True)
    p.within("attack.step_size", a.step_size, 0, low_open=True)
    p.within("attack.steps", a.steps, 1)
    p.one_of("train.loss", t.loss, TRAINING_LOSSES)
    p.one_of("train.compute_dtype", t.compute_dtype, sorted(backends.COMPUTE_DTYPES) + ["auto"])
    p.within("train.trades_beta", t.trades_beta, 0)
    p.within("train.epochs", t.epochs, 0, low_open=True)
    if p.within("train.batch_size", t.batch_size, 1):
        p.need(
            t.batch_size % process_count == 0,
            "train.batch_size",
            t.batch_size,
            f"a multiple of the {process_count} processes",
        )
        if p.within("train.original_fraction", t.original_fraction, 0, 1, high_open=True) and t.original_fraction > 0:
            per_batch = int(round(t.original_fraction * t.batch_size))
            p.need(
                0 < per_batch < t.batch_size,
                "train.original_fraction",
                t.original_fraction,
                f"a share that leaves originals and synthetic samples in each batch of {t.batch_size} (it gives {per_batch} originals)",
            )
    p.within("train.lr", t.lr, 0, low_open=True)
    p.within("train.momentum", t.momentum, 0, 1, high_open=True)
    p.within("train.weight_decay", t.weight_decay, 0)
    p.within("train.warmup_steps", t.warmup_steps, 0)
    p.within("train.label_smoothing", t.label_smoothing, 0, 1, high_open=True)
    p.within("train.ema_decay", t.ema_decay, 0, 1)
    p.within("train.ema_warmup_steps", t.ema_warmup_steps, 0)
    p.within("train.ema_start_fraction", t.ema_start_fraction, 0, 1, high_open=True)
    p.one_of("train.schedule", t.schedule, SCHEDULES)
    p.within("train.onecycle_pct_start", t.onecycle_pct_start, 0, 1, low_open=True, high_open=True)
    p.one_of("train.validation_loss", t.validation_loss, ("ce", "cw"))
    p.need(
        isinstance(t.first_step_batch_stats, bool),
        "train.first_step_batch_stats",
        t.first_step_batch_stats,
        "True or False",
    )
    p.within("train.crop_padding", t.crop_padding, 0)
    p.within("train.num_workers", t.num_workers, 0)
    p.within("train.validation_size", t.validation_size, 0)
    p.within("train.validation_every_epochs", t.validation_every_epochs, 0, low_open=True)
    p.within("train.validation_pgd_steps", t.validation_pgd_steps, 1)
    for key in ("checkpoint_every", "keep_checkpoints", "log_every_steps"):
        p.within(f"train.{key}", t[key], 1)
    p.within("train.log_every_s", t.log_every_s, 0)


def _scoring_problems(p: _Problems, config) -> None:
    s, ext = config.scoring, config.scoring.extrapolation
    p.one_of("scoring.score", s.score, importance.SCORES)
    p.within("scoring.train_epochs", s.train_epochs, 0, low_open=True)
    p.within("scoring.num_models", s.num_models, 1)
    p.one_of("scoring.history_inputs", s.history_inputs, ("clean", "pgd"))
    p.one_of("scoring.history_protocol", s.history_protocol, score.HISTORY_PROTOCOLS)
    if (
        p.within("scoring.history_early_stop", s.history_early_stop, 0)
        and s.history_early_stop
        and s.score in score.HISTORY_SCORES
    ):
        p.need(
            config.train.validation_size > 0,
            "scoring.history_early_stop",
            s.history_early_stop,
            "0 with train.validation_size=0: early stopping follows the validation robust accuracy",
        )
    if s.score == "du" and p.within("scoring.du_window", s.du_window, 2):
        p.need(
            s.du_window <= math.floor(s.train_epochs),
            "scoring.du_window",
            s.du_window,
            f"at most the {math.floor(s.train_epochs)} epochs the scoring run records (scoring.train_epochs={s.train_epochs})",
        )
    for key in ("slots", "chunk_size"):
        p.within(f"scoring.{key}", s[key], 1)
    p.one_of("scoring.deepfool.norm", s.deepfool.norm, NORMS)
    p.within("scoring.deepfool.max_iter", s.deepfool.max_iter, 1)
    p.within("scoring.deepfool.overshoot", s.deepfool.overshoot, 0)
    p.one_of("scoring.deepfool.form", s.deepfool.form, DEEPFOOL_FORMS)
    p.need(
        isinstance(s.deepfool.search_steps, int) and s.deepfool.search_steps >= 0,
        "scoring.deepfool.search_steps",
        s.deepfool.search_steps,
        "an integer >= 0 (the bisection's halvings in the 'dm_improves_at' form)",
    )
    candidates = s.deepfool.candidates
    p.need(
        candidates is None or 0 <= candidates <= config.data.num_classes - 1,
        "scoring.deepfool.candidates",
        candidates,
        f"0 (all classes) or a number of candidate classes in [1, {config.data.num_classes - 1}]",
    )
    if ext.enabled:
        p.need(
            s.score != "random",
            "scoring.extrapolation.enabled",
            True,
            "False with scoring.score='random' (extrapolation embeds with the scoring model)",
        )
        p.within("scoring.extrapolation.k", ext.k, 1)
        p.one_of("scoring.extrapolation.metric", ext.metric, METRICS)
        p.one_of("scoring.extrapolation.weighting", ext.weighting, ("uniform", "distance"))
        if p.one_of("scoring.extrapolation.engine", ext.engine, KNN_ENGINES) and ext.engine == "faiss":
            p.need(
                knn_engine_available(),
                "scoring.extrapolation.engine",
                ext.engine,
                "'auto' or 'jax': faiss is not installed (pip install faiss-cpu)",
            )
        p.within("scoring.extrapolation.holdout_fraction", ext.holdout_fraction, 0, 1, high_open=True)
        p.one_of("scoring.extrapolation.normalize", ext.normalize, NORMALIZATIONS)
        p.need(
            isinstance(ext.original_references, bool),
            "scoring.extrapolation.original_references",
            ext.original_references,
            "True or False",
        )
        if ext.embedding_model:
            p.one_of("scoring.extrapolation.embedding_model", ext.embedding_model, sorted(MODELS))
            p.need(
                bool(ext.embedding_from),
                "scoring.extrapolation.embedding_model",
                ext.embedding_model,
                "'' without scoring.extrapolation.embedding_from (the scoring model embeds)",
            )


def input_problems(config) -> tuple[list[str], splits.DataShape | None]:
    """Problems of the data files (exist, regular, readable, in the format) -> (problems, the data's shape or None)."""
    p = _Problems()
    for path in splits.input_files(config):
        if p.need(storage.exists(path), "data file", path, "an existing file (check the path)"):
            p.need(storage.isfile(path), "data file", path, "a regular file, not a directory")
    cache_dir = config.data.cache_dir
    if cache_dir and p.need(
        not storage.is_remote(cache_dir),
        "data.cache_dir",
        cache_dir,
        "a local directory (each host copies remote data files there)",
    ):
        p.extend(_writable_place(cache_dir, "data.cache_dir"))
    needed = {"npz": ("original", "test"), "cifar_tarball": ("tarball",)}.get(config.data.name, ())
    for key in needed:
        p.need(
            bool(config.data[key]),
            f"data.{key}",
            config.data[key],
            f"a file path (data.name={config.data.name!r} reads it)",
        )
    if p or config.data.name not in splits.DATA_SOURCES:
        return p, None
    try:
        return p, splits.data_shape(config)
    except (UserError, ValueError, OSError, ImportError) as error:
        p.append(f"data: {error}")
        return p, None


def data_problems(config, shape: splits.DataShape) -> list[str]:
    """Problems of settings that depend on the data's sizes."""
    p = _Problems()
    p.within("train.validation_size", config.train.validation_size, 0, shape.num_original, high_open=True)
    channels = shape.image_shape[-1]
    for key in ("mean", "std"):
        value = config.model.kwargs.to_dict().get(key)
        if value is not None:
            allowed = "1 value" if channels == 1 else f"1 or {channels} values"
            p.need(
                len(value) in (1, channels),
                f"model.kwargs.{key}",
                value,
                f"{allowed}, one per image channel ({channels})",
            )
    ext = config.scoring.extrapolation
    if score.needed(config) and ext.enabled:
        synthetic = sum(shape.num_synthetic)
        if p.within("scoring.extrapolation.subset_size", ext.subset_size, 1, synthetic):
            references = (shape.num_original - config.train.validation_size + ext.subset_size) * (
                1 - ext.holdout_fraction
            )
            p.need(
                references >= ext.k,
                "scoring.extrapolation.k",
                ext.k,
                f"at most the about {int(references)} scored reference rows",
            )
    return p


def _writable_place(path: str, name: str = "--workdir") -> list[str]:
    """The directory `path` (the setting `name`) is a directory, or can be made as one, and can be written (in an
    object store: its bucket exists and the path is no object; whether this user may write there shows at the first write)."""
    if storage.is_remote(path):
        bucket = path.split("://", 1)[0] + "://" + path.split("://", 1)[1].split("/", 1)[0]
        if not storage.exists(bucket):
            return [f"{name}={path!r}: a path in an existing bucket ({bucket} does not exist or cannot be listed)"]
        if storage.isfile(path):
            return [f"{name}={path!r}: a directory (this is an object)"]
        return []
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"{name}={path!r}: a directory (this is a file)"]
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        return [f"{name}={path!r}: a directory this user can create and write ({existing} is not writable)"]
    return []


def workdir_problems(config, workdir: str) -> list[str]:
    """Recorded settings that differ for phases that left outputs, and changed input files."""
    found = []
    for phase in (score, select, train, evaluate):
        if phase is score and not score.needed(config):
            continue
        try:
            run_dir.check_settings(
                workdir, phase.NAME, phase.settings(config), run_dir.has_outputs(workdir, phase.NAME)
            )
        except UserError as error:
            found.append(str(error))
    try:
        run_dir.check_inputs(workdir, [f for f in splits.input_files(config) if storage.isfile(f)])
    except UserError as error:
        found.append(str(error))
    return found


def phase_problems(config, workdir: str, phases: tuple[str, ...]) -> list[str]:
    """The phases asked for are an ordered subset, and what each needs from the phases left out is in the work dir."""
    from jax_advprune.pipeline import PHASES

    if (
        not phases
        or any(p not in PHASES for p in phases)
        or list(phases) != sorted(phases, key=PHASES.index)
        or len(set(phases)) != len(phases)
    ):
        return [f"--phases={','.join(phases)}: an ordered subset of {','.join(PHASES)}"]
    found = []

    def missing(phase: str, path: str) -> None:
        found.append(f"--phases={','.join(phases)}: {phase} needs {path} (run the phase before it first)")

    if "select" in phases and "score" not in phases and score.needed(config):
        if not run_dir.is_complete(workdir, "score"):
            missing("select", run_dir.scores_dir(workdir))
    if "train" in phases and "select" not in phases and not run_dir.is_complete(workdir, "select"):
        missing("train", run_dir.selection_dir(workdir))
    if (
        "evaluate" in phases
        and "train" not in phases
        and not config.eval.init_from
        and not run_dir.is_complete(workdir, "train")
    ):
        missing("evaluate", run_dir.final_checkpoint_dir(workdir) + " or eval.init_from")
    return found


def init_from_problems(config) -> list[str]:
    """scoring/train/eval.init_from name weights that exist and fit what uses them."""
    from jax_advprune.phases.weights import path_problem

    p = _Problems()
    for key, path in weight_paths(config):
        problem = path_problem(path)
        p.need(problem is None, key, path, problem or "")
    if config.scoring.init_from and score.needed(config):
        p.need(
            config.scoring.score not in score.HISTORY_SCORES,
            "scoring.init_from",
            config.scoring.init_from,
            f"'' with scoring.score={config.scoring.score!r}: a history score needs a training run to record",
        )
        p.need(
            config.scoring.num_models == 1 or config.scoring.score not in ("el2n", "grand"),
            "scoring.num_models",
            config.scoring.num_models,
            "1 with scoring.init_from (one given model)",
        )
    return p


def weight_paths(config) -> list[tuple[str, str]]:
    """[(setting, path)] of the weights a run loads: scoring/train/eval.init_from and, when it is used,
    scoring.extrapolation.embedding_from."""
    out = [(f"{key}.init_from", config[key].init_from) for key in ("scoring", "train", "eval") if config[key].init_from]
    ext = config.scoring.extrapolation
    if ext.enabled and ext.embedding_from and score.needed(config):
        out.append(("scoring.extrapolation.embedding_from", ext.embedding_from))
    return out


def _weights_fit(config, image_shape: tuple) -> list[str]:
    """Each checkpoint loads into its model (keys and shapes): config.model, or for embedding_from the embedding's
    model; read now rather than after the lock."""
    from jax_advprune.phases.weights import embedding_config, load_variables

    found = []
    for key, path in weight_paths(config):
        try:
            load_variables(
                path, embedding_config(config) if key.startswith("scoring.extrapolation") else config, image_shape
            )
        except (UserError, ValueError, OSError, TypeError) as error:
            found.append(f"{key}={path!r}: {error}")
    return found


def check_run(
    config,
    workdir: str,
    *,
    available_devices: int,
    process_count: int = 1,
    platform: str = "cpu",
    phases: tuple[str, ...] | None = None,
) -> None:
    """Raises ConfigError listing every problem of the config, its inputs and the work directory; writes nothing."""
    problems = config_problems(
        config, available_devices=available_devices, process_count=process_count, platform=platform
    )
    problems += init_from_problems(config)
    if phases is not None:
        problems += phase_problems(config, workdir, phases)
    found, shape = input_problems(config)
    problems += found
    if shape is not None:
        problems += data_problems(config, shape)
        if not problems:
            problems += _weights_fit(config, shape.image_shape)
    problems += _writable_place(workdir)
    if storage.isdir(workdir):
        problems += workdir_problems(config, workdir)
    if problems:
        raise ConfigError(problems)
