"""Train phase: adversarial training of a fresh model on the selection -> checkpoints/, checkpoints_best/, metrics.jsonl.

`train_model` is also how the score phase trains its scoring models.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from jax_advprune import parallel, run_dir, storage, training
from jax_advprune.checkpoint import Checkpointer, abstract_like, best_checkpointer
from jax_advprune.data.loader import BatchReader, batch_iterator, make_plan
from jax_advprune.data.splits import Data
from jax_advprune.evaluation import pgd_evaluator
from jax_advprune.metrics import Progress
from jax_advprune.phases.common import apply_fn, build_model, section

log = logging.getLogger("jax_advprune")

NAME = "train"


def settings(config) -> dict:
    return section(config, "data", "model", "attack", "train", "pruning") | {"seed": config.seed}


def batch_plan(config, data: Data, keep: np.ndarray, seed: int):
    """The loader's BatchPlan for the kept trainable rows (train.batch_size, original_fraction, ...)."""
    tcfg = config.train
    return make_plan(
        keep & data.trainable,
        data.pool.num_original,
        batch_size=tcfg.batch_size,
        original_fraction=tcfg.original_fraction if tcfg.original_fraction > 0 else None,
        synthetic_with_replacement=tcfg.synthetic_with_replacement,
        seed=seed,
    )


def _validation(
    config,
    data: Data,
    eval_model,
    mesh,
    ckpt_dir: str,
    steps_per_epoch: int,
    seed: int,
    early_stop: int = 0,
    min_steps: int = 0,
) -> training.Validation | None:
    """Model selection on the validation slice (config.train.validation_size originals), or None without one;
    with `early_stop` > 0 training stops after that many validations without a better one (not before min_steps)."""
    held_out = np.flatnonzero(~data.trainable)
    if not len(held_out):
        return None
    val_images, val_labels = data.pool.read(held_out)
    evaluate = pgd_evaluator(
        apply_fn(eval_model),
        eps=config.attack.eps,
        step_size=config.attack.eps * config.eval.step_fraction,
        steps=config.train.validation_pgd_steps,
        norm=config.attack.norm,
        loss=config.train.validation_loss,
        batch_size=config.eval.batch_size,
        mesh=mesh,
    )
    return training.Validation(
        evaluate=lambda variables: evaluate(variables, val_images, val_labels, seed),
        every=max(1, int(round(config.train.validation_every_epochs * steps_per_epoch))),
        checkpointer=best_checkpointer(ckpt_dir),
        patience=early_stop,
        min_steps=min_steps,
    )


def train_model(
    config,
    data: Data,
    mesh,
    keep: np.ndarray,
    eps: np.ndarray,
    *,
    epochs: float,
    ckpt_dir: str,
    metrics_path: str,
    phase: str,
    seed: int,
    callbacks: tuple = (),
    initial: dict | None = None,
    early_stop: int = 0,
    min_steps: int = 0,
):
    """Adversarial training (config.train.loss) of a model on the kept trainable rows with per-sample eps.

    keep, eps: (N,) over the pool. The model starts from `initial` variables, or fresh
    from `seed`. Resumes from ckpt_dir. The validation slice is never trained on;
    robust accuracy there picks the best checkpoint, kept in `<ckpt_dir>_best`.
    With `early_stop` > 0 (validations without improvement) the run may end before
    `epochs`, never before `min_steps`. Returns (model with float32 compute, final TrainState).
    """
    tcfg = config.train
    model, eval_model = build_model(config, tcfg.compute_dtype), build_model(config)
    plan = batch_plan(config, data, keep, seed)
    num_steps = max(1, int(np.ceil(epochs * plan.steps_per_epoch)))
    tx = training.make_optimizer(tcfg, num_steps, plan.steps_per_epoch)
    # Placed as the step's outputs are before a checkpoint is restored into it: restored arrays are committed
    # to their devices, and a multi-host run cannot move them to other hosts' devices afterwards.
    state = jax.device_put(
        training.init_train_state(model, tx, data.pool.image_shape, seed, initial), parallel.replicated(mesh)
    )
    reader = BatchReader(
        data.pool,
        plan,
        eps,
        crop_padding=tcfg.crop_padding,
        flip=tcfg.flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = batch_iterator(reader, num_steps, num_workers=tcfg.num_workers)
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=tcfg.keep_checkpoints)
    validation = _validation(
        config, data, eval_model, mesh, ckpt_dir, plan.steps_per_epoch, seed, early_stop, min_steps
    )
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state), batches)
        training.check_finite(state, f"the state restored from {ckpt_dir} step {int(state.step)}", checkpointer)
        if int(state.step) >= num_steps or (validation is not None and validation.stops(int(state.step))):
            log.info("[%s] complete, skipped (checkpoint step %d in %s)", phase, int(state.step), ckpt_dir)
            checkpointer.close()
            if validation is not None:
                validation.checkpointer.close()
            return eval_model, state
        log.info("[%s] resumed from %s at step %d", phase, ckpt_dir, int(state.step))
    log.info(
        "[%s] %s, %d steps (%.3g epochs of %d steps), batch %d, %d kept samples, %d held out for validation, %s compute",
        phase,
        tcfg.loss,
        num_steps,
        epochs,
        plan.steps_per_epoch,
        tcfg.batch_size,
        len(plan.kept),
        int((~data.trainable).sum()),
        tcfg.compute_dtype,
    )
    train_step = training.make_train_step(
        model,
        tx,
        tcfg,
        config.attack,
        mesh,
        schedule=training.make_schedule(tcfg, num_steps, plan.steps_per_epoch),
        ema_from=training.ema_start(tcfg, num_steps),
    )
    writer = storage.is_writer()
    progress = Progress(
        phase,
        num_steps,
        tcfg.batch_size,
        metrics_path if writer else None,
        every_s=tcfg.log_every_s,
        first_step=int(state.step),
        tensorboard_dir=os.path.join(os.path.dirname(metrics_path), "tensorboard", phase.replace("/", "_"))
        if writer
        else None,
    )
    try:
        state = training.fit(
            state,
            train_step,
            batches,
            num_steps=num_steps,
            checkpointer=checkpointer,
            checkpoint_every=tcfg.checkpoint_every,
            progress=progress,
            log_every_steps=tcfg.log_every_steps,
            validation=validation,
            callbacks=callbacks,
        )
        if validation is not None:
            log.info(
                "[%s] best validation checkpoint: step %s in %s",
                phase,
                validation.checkpointer.best_step(),
                validation.checkpointer.directory,
            )
        if int(state.step) < num_steps:
            log.info(
                "[%s] stopped early at step %d of %d: %d validations without a better robust accuracy",
                phase,
                int(state.step),
                num_steps,
                early_stop,
            )
    finally:
        checkpointer.close()
        progress.close()
        if validation is not None:
            validation.checkpointer.close()
    return eval_model, state


def load_selection(workdir: str, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """selection/keep.npy (N,) bool and eps.npy (N,) float32, checked against the pool's size."""
    keep = storage.load_npy(run_dir.selection_file(workdir, "keep.npy"))
    eps = storage.load_npy(run_dir.selection_file(workdir, "eps.npy"))
    for name, array in (("keep.npy", keep), ("eps.npy", eps)):
        if array.shape != (pool_size,):
            raise ValueError(
                f"{run_dir.selection_file(workdir, name)} has shape {array.shape}, expected ({pool_size},), one entry per pool sample"
            )
    return keep.astype(bool), eps.astype(np.float32)


def run(config, workdir: str, data: Data, mesh, initial: dict | None = None):
    """Adversarial training (train.loss) on the selection, from `initial` variables (train.init_from) or fresh;
    resumes. Returns (model, final state)."""
    run_dir.record_settings(workdir, NAME, settings(config))
    keep, eps = load_selection(workdir, len(data.pool))
    return train_model(
        config,
        data,
        mesh,
        keep,
        eps,
        epochs=config.train.epochs,
        ckpt_dir=run_dir.final_checkpoint_dir(workdir),
        metrics_path=run_dir.metrics_file(workdir),
        phase=NAME,
        seed=config.seed,
        initial=initial,
    )
