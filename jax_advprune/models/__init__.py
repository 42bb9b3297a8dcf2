"""Flax models and the name -> constructor registry used by configs."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jax_advprune.models.preact_resnet import preact_resnet18
from jax_advprune.models.small_cnn import SmallCNN

MODELS: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "preact_resnet18": preact_resnet18}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model `name` with keyword arguments from the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
