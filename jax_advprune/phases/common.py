"""What the phases share: the model from config, the settings sections that decide outputs."""

from __future__ import annotations

import ml_collections

from jax_advprune import backends
from jax_advprune.models import create_model

# Fields that change how a run reports, saves or reads, not what it computes: free to change on a rerun
# (data.cache_dir: where a host keeps local copies of remote data files).
OPERATIONAL_FIELDS = ("log_every_s", "log_every_steps", "checkpoint_every", "keep_checkpoints", "cache_dir")


def build_model(config, compute_dtype: str = "float32"):
    """The configured model; `compute_dtype` 'bfloat16' computes in bf16 with float32 parameters, 'auto' in bf16 on
    TPU and GPU and float32 on the CPU (`backends.compute_dtype`)."""
    kwargs = config.model.kwargs.to_dict()
    return create_model(
        config.model.name, num_classes=config.data.num_classes, dtype=backends.compute_dtype(compute_dtype), **kwargs
    )


def apply_fn(model):
    """(variables, images in [0, 1]) -> logits, inference mode (BatchNorm running averages)."""
    return lambda variables, x: model.apply(variables, x, train=False)


def features_fn(model):
    """(variables, images in [0, 1]) -> (logits, penultimate features), inference mode."""
    return lambda variables, x: model.apply(variables, x, train=False, return_features=True)


def section(config: ml_collections.ConfigDict, *names: str, drop: tuple[str, ...] = ()) -> dict:
    """The settings of config sections `names` that decide a phase's outputs (operational fields left out)."""
    out = {name: config[name].to_dict() if hasattr(config[name], "to_dict") else config[name] for name in names}
    for part in out.values():
        if isinstance(part, dict):
            for field in OPERATIONAL_FIELDS + drop:
                part.pop(field, None)
    return out
