"""Weights from a path, for `scoring.init_from`, `train.init_from` and `eval.init_from`.

A path is one of:
  - a PyTorch (`.pt`, `.pth`, `.bin`) or `.safetensors` checkpoint with the reference
    keys (DM-Improves-AT, RobustBench, Gowal et al., or `python -m jax_advprune.export`),
    imported into config.model (jax_advprune.models.import_torch); the config's
    model.kwargs (depth, width, activation, mean, std) must describe it;
  - a jax_advprune work directory: the EMA weights of its best-validation checkpoint
    (the final one without validation), whose model must equal config.model;
  - one checkpoint of a jax_advprune run (`<workdir>/checkpoints/<step>`): its EMA weights.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_advprune import run_dir, storage
from jax_advprune.checkpoint import Checkpointer, best_checkpoint_dir, best_checkpointer
from jax_advprune.errors import UserError
from jax_advprune.models import create_model, import_torch
from jax_advprune.run_dir import final_checkpoint_dir, settings_file
from jax_advprune.storage import read_json

WEIGHTS = ("best_ema", "ema", "raw")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _restore(step_dir: str) -> dict:
    """The train state saved in `step_dir`, as host numpy arrays, whatever devices and processes saved it
    (a pod's checkpoint restores on a laptop; in a multi-host run every process reads it whole)."""
    path = os.path.join(storage.absolute(step_dir), "state")
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    return ocp.PyTreeCheckpointer().restore(path, restore_args=as_numpy)


def saved_variables(workdir: str, weights: str):
    """(model settings {'name', 'kwargs', 'num_classes'}, variables, step) of the train phase's `weights` in `workdir`.

    weights: 'best_ema' (the best-validation checkpoint's EMA weights; the final checkpoint's
    when the run had no validation), 'ema' or 'raw' (the final checkpoint).
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r}: one of {', '.join(WEIGHTS)}")
    model, state, step = saved_state(workdir, best=weights == "best_ema")
    return (
        model,
        {"params": state["ema_params" if weights != "raw" else "params"], "batch_stats": state["batch_stats"]},
        step,
    )


def saved_state(workdir: str, best: bool = False):
    """(model settings, the restored train state as a dict, step) of `workdir`'s final checkpoint, or with `best`
    of its best-validation checkpoint (the final one when the run had no validation)."""
    if not storage.exists(settings_file(workdir, "train")):
        raise UserError(
            f"{workdir} holds no trained model ({settings_file(workdir, 'train')} is missing): run the train phase first"
        )
    if not run_dir.is_complete(workdir, "train"):
        raise UserError(
            f"{workdir} holds no trained model yet ({final_checkpoint_dir(workdir)} has no checkpoint): run the train phase first"
        )
    settings = read_json(settings_file(workdir, "train"))
    ckpt_dir, step = final_checkpoint_dir(workdir), None
    if best and storage.isdir(best_checkpoint_dir(ckpt_dir)):
        checkpointer = best_checkpointer(ckpt_dir)
        step = checkpointer.best_step()
        checkpointer.close()
        if step is not None:
            ckpt_dir = best_checkpoint_dir(ckpt_dir)
    if step is None and storage.isdir(ckpt_dir):
        # orbax's listing, not directory names: in a bucket a step's directory exists before its save is complete
        checkpointer = Checkpointer(ckpt_dir)
        step = checkpointer.latest_step()
        checkpointer.close()
    if step is None:
        raise UserError(f"{workdir} has no checkpoint in {ckpt_dir}")
    model = {
        "name": settings["model"]["name"],
        "kwargs": settings["model"]["kwargs"],
        "num_classes": settings["data"]["num_classes"],
    }
    return model, _restore(os.path.join(ckpt_dir, str(step))), int(step)


def build_saved_model(model_settings: dict):
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_settings["kwargs"].items()}
    return create_model(model_settings["name"], num_classes=model_settings["num_classes"], **kwargs)


def embedding_config(config):
    """The config whose model reads scoring.extrapolation.embedding_from: config.model, or with
    scoring.extrapolation.embedding_model set that model with embedding_kwargs."""
    ext = config.scoring.extrapolation
    if not ext.get("embedding_model"):
        return config
    embed = config.copy_and_resolve_references()
    embed.model.name = ext.embedding_model
    embed.model.kwargs = ext.embedding_kwargs.copy_and_resolve_references()
    return embed


def path_problem(path: str) -> str | None:
    """Why `path` is no weights source (None when it looks like one), without reading it."""
    if not storage.exists(path):
        return "no such file or directory"
    if storage.isfile(path):
        return None if path.endswith(TORCH_SUFFIXES) else f"a checkpoint file ending in {', '.join(TORCH_SUFFIXES)}"
    if (storage.exists(settings_file(path, "train")) and run_dir.is_complete(path, "train")) or storage.isdir(
        os.path.join(path, "state")
    ):
        return None
    return "a jax_advprune work directory whose train phase saved a checkpoint, or a checkpoint directory (with state/)"


def load_variables(path: str, config, image_shape: tuple) -> dict:
    """Variables {'params', 'batch_stats'} for config.model from `path` (see the module docstring)."""
    model = build_saved_model(
        {"name": config.model.name, "kwargs": config.model.kwargs.to_dict(), "num_classes": config.data.num_classes}
    )
    if storage.isfile(path):
        kwargs = config.model.kwargs.to_dict() | {"mean": tuple(model.mean), "std": tuple(model.std)}
        return import_torch(
            path, name=config.model.name, num_classes=config.data.num_classes, image_shape=image_shape, **kwargs
        )[1]
    if storage.isdir(os.path.join(path, "state")):
        state = _restore(path)
        return {"params": state["ema_params"], "batch_stats": state["batch_stats"]}
    settings, variables, _ = saved_variables(path, "best_ema")
    if build_saved_model(settings) != model:
        raise UserError(
            f"{path} holds a {settings['name']} {settings['kwargs']} with {settings['num_classes']} classes, "
            f"but this run's model is {config.model.name} {config.model.kwargs.to_dict()} with {config.data.num_classes}"
        )
    return variables
