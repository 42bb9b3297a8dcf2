"""The training setup shared by the two-process test and its one-process reference."""

import jax
import ml_collections
import numpy as np

from jax_advprune import training
from jax_advprune.data.loader import BatchReader, make_plan
from jax_advprune.data.sources import open_pool
from jax_advprune.models import create_model

NUM_STEPS = 3


def build(pool_dir: str, mesh, process_index: int, process_count: int):
    """(state, train_step, reader of this process's share) for a TRADES small CNN on the test pool."""
    cfg = ml_collections.ConfigDict(dict(
        lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_steps=1, label_smoothing=0.1,
        ema_decay=0.995, ema_warmup_steps=0, loss="trades", trades_beta=6.0,
    ))
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=0.1, step_size=0.05, steps=2))
    pool = open_pool(f"{pool_dir}/orig.npz", [f"{pool_dir}/syn.npz"], 10)
    plan = make_plan(np.ones(len(pool), bool), pool.num_original, batch_size=16, original_fraction=0.25,
                     synthetic_with_replacement=True, seed=0)
    reader = BatchReader(pool, plan, np.full(len(pool), 0.1, np.float32), crop_padding=1,
                         process_index=process_index, process_count=process_count)
    model = create_model("small_cnn", num_classes=10, widths=(8, 16))
    tx = training.make_optimizer(cfg, NUM_STEPS)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    return state, training.make_train_step(model, tx, cfg, attack, mesh), reader


def flat_params(state) -> dict:
    """{'a/b/kernel': array} of params and EMA params, read from this process's replica."""
    out = {}
    for prefix, tree in (("params", state.params), ("ema", state.ema_params)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf.addressable_data(0))
    return out
