"""Select phase: the pruning strategy over the scores -> selection/keep.npy, eps.npy, meta.json."""

from __future__ import annotations

import logging

import numpy as np

from jax_advprune import run_dir, storage
from jax_advprune.data.splits import Data
from jax_advprune.phases.common import section
from jax_advprune.pruning import strategies

log = logging.getLogger("jax_advprune")

NAME = "select"
SCOPES = ("all", "synthetic")


def settings(config) -> dict:
    """The pruning settings, and the data section: a selection is indexed by that pool (export_selection reopens it)."""
    return section(config, "pruning", "data") | {
        "eps": config.attack.eps,
        "seed": config.seed,
        "validation_size": config.train.validation_size,
        "score": config.scoring.score,
    }


def run(config, workdir: str, data: Data) -> None:
    """Applies the pruning strategy to the scores of the trainable rows (the validation slice is never kept)."""
    out_dir = run_dir.selection_dir(workdir)
    if run_dir.is_complete(workdir, NAME):
        log.info("[select] complete, skipped (%s)", out_dir)
        return
    run_dir.record_settings(workdir, NAME, settings(config))
    pcfg = config.pruning
    scores = None if pcfg.strategy == "random" else storage.load_npy(run_dir.score_file(workdir, config.scoring.score))
    labels = data.pool.labels()
    keep, eps = strategies.select(
        pcfg.strategy,
        scores=scores,
        labels=labels,
        eligible=data.trainable,
        prunable=data.pool.is_synthetic if pcfg.scope == "synthetic" else np.ones(len(labels), bool),
        keep_ratio=pcfg.keep_ratio,
        base_eps=config.attack.eps,
        class_balanced=pcfg.class_balanced,
        seed=config.seed,
        score=config.scoring.score,
        score_norm=config.scoring.deepfool.norm,
        attack_norm=config.attack.norm,
        puma=pcfg.puma.to_dict(),
    )
    storage.save_npy(run_dir.selection_file(workdir, "keep.npy"), keep)
    storage.save_npy(run_dir.selection_file(workdir, "eps.npy"), eps)
    synthetic = data.pool.is_synthetic
    meta = {
        "strategy": pcfg.strategy,
        "settings": pcfg.to_dict(),
        "kept": int(keep.sum()),
        "kept_original": int((keep & ~synthetic).sum()),
        "kept_synthetic": int((keep & synthetic).sum()),
        "pool_size": len(keep),
        "held_out_for_validation": int((~data.trainable).sum()),
        "kept_per_class": np.bincount(labels[keep], minlength=config.data.num_classes).tolist(),
        "lowered_eps": int((keep & (eps < config.attack.eps)).sum()),
        "mean_eps_kept": float(eps[keep].mean()) if keep.any() else 0.0,
    }
    storage.write_json(run_dir.selection_file(workdir, "meta.json"), meta)
    log.info(
        "[select] %s kept %d / %d (%d original, %d synthetic), %d with lowered eps",
        pcfg.strategy,
        meta["kept"],
        len(keep),
        meta["kept_original"],
        meta["kept_synthetic"],
        meta["lowered_eps"],
    )
