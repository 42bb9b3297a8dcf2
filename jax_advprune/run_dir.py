"""The run's work directory: where each phase's files are, when a phase is complete, and what the outputs were made
from (the settings guard and the input fingerprints). The phases, `validate`, `export_selection` and `weights`
ask here; nothing below the phases does (the writers they share are in `storage`).

    <workdir>/
      data/                         the embedded or converted data set (data.splits)
      scores/<score>.npy, extras    score phase; scores/meta.json marks it complete
        history/[<run>/]epoch_*.npz   the scoring run's per-pass predictions (resume log)
        deepfool_chunks/chunk_*.npz   DeepFool margins per chunk (resume log)
        embedding.npy, computed_scores.npz   with extrapolation: the kNN's queries, the computed scores
        extrapolation_check.json      python -m jax_advprune.check_extrapolation (optional)
      scoring_model[_<run>]/checkpoints[_best]/   the scoring model's training
      selection/keep.npy, eps.npy   select phase; selection/meta.json marks it complete
      checkpoints/, checkpoints_best/   train phase (orbax; the last step marks it complete)
      evaluate_passes/<weights>/pass_*.npz   AutoAttack's passes (resume log)
      results.json, report.md       evaluate phase; results.json marks it complete
      settings/<phase>.json, inputs.json   what the outputs were made from
      metrics.jsonl, run.log, timings.json, tensorboard/<phase>/, lock
"""

from __future__ import annotations

import hashlib
import os

from jax_advprune import storage
from jax_advprune.errors import UserError

PHASES = ("score", "select", "train", "evaluate")


# --------------------------------------------------------------------------- layout


def data_dir(workdir: str) -> str:
    return os.path.join(workdir, "data")


def scores_dir(workdir: str) -> str:
    return os.path.join(workdir, "scores")


def computed_scores_file(workdir: str) -> str:
    """scores/computed_scores.npz: with extrapolation, `rows` (M,) int64 pool rows that got a computed score and
    `values` (M,) float32 those scores (held-out rows included), for `check_extrapolation`."""
    return os.path.join(scores_dir(workdir), "computed_scores.npz")


def embedding_file(workdir: str) -> str:
    """scores/embedding.npy: (trainable rows, D) float32, the kNN queries' embedding as searched, in row order."""
    return os.path.join(scores_dir(workdir), "embedding.npy")


def extrapolation_check_file(workdir: str) -> str:
    return os.path.join(scores_dir(workdir), "extrapolation_check.json")


def score_file(workdir: str, score: str) -> str:
    """scores/<score>.npy: one float per pool row."""
    return os.path.join(scores_dir(workdir), f"{score}.npy")


def history_dir(workdir: str, run: str | None = None) -> str:
    """scores/history[/<run>]: the scoring run's recorded predictions (one directory per run of a per-part history)."""
    return os.path.join(scores_dir(workdir), "history", *((run,) if run else ()))


def deepfool_chunks_dir(workdir: str) -> str:
    return os.path.join(scores_dir(workdir), "deepfool_chunks")


def scoring_model_dir(workdir: str, suffix: str = "") -> str:
    """scoring_model<suffix>: the scoring model's training run ('' or '_<run>')."""
    return os.path.join(workdir, f"scoring_model{suffix}")


def scoring_checkpoint_dir(workdir: str, suffix: str = "") -> str:
    return os.path.join(scoring_model_dir(workdir, suffix), "checkpoints")


def selection_dir(workdir: str) -> str:
    return os.path.join(workdir, "selection")


def selection_file(workdir: str, name: str) -> str:
    """selection/<name>: keep.npy (N,) bool, eps.npy (N,) float32, meta.json."""
    return os.path.join(selection_dir(workdir), name)


def final_checkpoint_dir(workdir: str) -> str:
    """Checkpoints of the train phase (the final model; scoring models have their own)."""
    return os.path.join(workdir, "checkpoints")


def evaluate_passes_dir(workdir: str, weights: str) -> str:
    return os.path.join(workdir, "evaluate_passes", weights)


def results_file(workdir: str) -> str:
    return os.path.join(workdir, "results.json")


def report_file(workdir: str) -> str:
    return os.path.join(workdir, "report.md")


def metrics_file(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


def log_file(workdir: str) -> str:
    return os.path.join(workdir, "run.log")


def timings_file(workdir: str) -> str:
    return os.path.join(workdir, "timings.json")


def tensorboard_dir(workdir: str, phase: str) -> str:
    """tensorboard/<phase> ('score/train' -> score_train)."""
    return os.path.join(workdir, "tensorboard", phase.replace("/", "_"))


def settings_file(workdir: str, phase: str) -> str:
    return os.path.join(workdir, "settings", f"{phase}.json")


def inputs_file(workdir: str) -> str:
    return os.path.join(workdir, "settings", "inputs.json")


def lock_file(workdir: str) -> str:
    return os.path.join(workdir, "lock")


# --------------------------------------------------------------------------- complete, or begun


def is_complete(workdir: str, phase: str) -> bool:
    """Whether `phase` finished in `workdir`: score and select wrote their meta.json (last, after their arrays),
    evaluate its results.json; train saved a checkpoint of the final model (whether that is the configured last
    step, or an early stop, the train phase decides against the config: a rerun resumes or skips)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if phase == "score":
        return storage.exists(os.path.join(scores_dir(workdir), "meta.json"))
    if phase == "select":
        return storage.exists(selection_file(workdir, "meta.json"))
    if phase == "train":
        return storage.isdir(final_checkpoint_dir(workdir)) and bool(storage.listdir(final_checkpoint_dir(workdir)))
    return storage.exists(results_file(workdir))


def has_outputs(workdir: str, phase: str) -> bool:
    """Whether `phase` wrote anything in `workdir`, complete or not (what the settings guard protects)."""
    if phase == "score":
        return any(storage.exists(d) for d in (scores_dir(workdir), scoring_model_dir(workdir)))
    if phase == "select":
        return storage.exists(selection_dir(workdir))
    return is_complete(workdir, phase)


# --------------------------------------------------------------------------- settings guard


class SettingsMismatchError(UserError):
    """The work directory holds outputs of a phase made with other settings."""


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differences(workdir: str, phase: str, settings: dict) -> list[str]:
    """'key: old -> new' for every setting of `phase` that differs from the recorded one ([] when none is recorded)."""
    path = settings_file(workdir, phase)
    if not storage.exists(path):
        return []
    old, new = flatten(storage.read_json(path)), flatten(storage.to_json_types(settings))
    return [
        f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def check_settings(workdir: str, phase: str, settings: dict, has_outputs: bool) -> None:
    """Raises SettingsMismatchError naming every differing key when `phase` left outputs made with other settings.

    A phase that left no outputs (it failed before writing any) may be rerun with other settings.
    """
    diffs = settings_differences(workdir, phase, settings)
    if diffs and has_outputs:
        raise SettingsMismatchError(
            f"{workdir} already holds '{phase}' outputs made with other settings ({settings_file(workdir, phase)}):\n  "
            + "\n  ".join(diffs)
            + "\nFix: use a new --workdir, or rerun with the recorded settings (nothing is overwritten)."
        )


def record_settings(workdir: str, phase: str, settings: dict) -> None:
    """Records the settings of `phase` when it starts (replacing a record its outputs do not depend on)."""
    if settings_differences(workdir, phase, settings) or not storage.exists(settings_file(workdir, phase)):
        storage.write_json(settings_file(workdir, phase), settings)


# --------------------------------------------------------------------------- input fingerprints


FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_BYTES = 4096


def fingerprint(path: str) -> str:
    """'size:blake2b' of a file: its size and a hash of FINGERPRINT_BLOCKS blocks of 4 KiB at evenly spaced offsets
    (first and last included): 256 KiB read whatever the size, so a 50 GB pool costs milliseconds.

    Detects a file replaced by another of the same name (a regenerated pool differs
    everywhere); an edit of a few bytes between the sampled blocks goes unnoticed.
    """
    size = storage.getsize(path)
    digest = hashlib.blake2b(digest_size=16)
    span = max(size - FINGERPRINT_BLOCK_BYTES, 0)
    offsets = sorted({int(round(i * span / (FINGERPRINT_BLOCKS - 1))) for i in range(FINGERPRINT_BLOCKS)})
    for block in storage.read_blocks(path, offsets, FINGERPRINT_BLOCK_BYTES):
        digest.update(block)
    return f"{size}:{digest.hexdigest()}"


class InputChangedError(UserError):
    """An input file differs from the one the work directory's outputs were made from."""


def check_inputs(workdir: str, paths: list[str]) -> dict[str, str]:
    """Fingerprints of `paths`; raises InputChangedError naming each file that differs from the recorded fingerprint.

    Paths the record does not hold are not compared (they are recorded by `record_inputs`).
    """
    current = {storage.absolute(p): fingerprint(p) for p in paths}
    if storage.exists(inputs_file(workdir)):
        recorded = storage.read_json(inputs_file(workdir))
        changed = [p for p, fp in current.items() if p in recorded and recorded[p] != fp]
        if changed:
            raise InputChangedError(
                f"{len(changed)} input file(s) changed since this work directory's outputs were made from them "
                f"(size and sampled content differ from {inputs_file(workdir)}):\n  "
                + "\n  ".join(changed)
                + "\nFix: restore the original files, or use a new --workdir for the new data."
            )
    return current


def record_inputs(workdir: str, fingerprints: dict[str, str]) -> None:
    """Adds `fingerprints` to the record (first seen wins: a recorded file is never re-recorded)."""
    recorded = storage.read_json(inputs_file(workdir)) if storage.exists(inputs_file(workdir)) else {}
    merged = {**fingerprints, **recorded}
    if merged != recorded:
        storage.write_json(inputs_file(workdir), merged)


# --------------------------------------------------------------------------- phase wall times


def add_phase_seconds(workdir: str, phase: str, seconds: float) -> None:
    """Adds `seconds` of wall time to `phase`'s total in timings.json (summed over the runs that resumed it)."""
    totals = storage.read_json(timings_file(workdir)) if storage.exists(timings_file(workdir)) else {}
    totals[phase] = round(totals.get(phase, 0.0) + seconds, 3)
    storage.write_json(timings_file(workdir), totals)
