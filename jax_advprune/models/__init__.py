"""Flax models, the name -> constructor registry used by configs, and `import_torch` (PyTorch checkpoints in)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jax_advprune.models.preact_resnet import preact_resnet18
from jax_advprune.models.small_cnn import SmallCNN
from jax_advprune.models.wide_resnet import wide_resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": wide_resnet,  # kwargs depth, width, activation ('relu' | 'swish')
    "wrn28_10": lambda **kw: wide_resnet(28, 10, **kw),
    "wrn34_10": lambda **kw: wide_resnet(34, 10, **kw),
    "wrn70_16": lambda **kw: wide_resnet(70, 16, **kw),
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model `name` with keyword arguments from the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


from jax_advprune.models.torch_import import import_torch  # noqa: E402  (needs create_model above)

__all__ = ["MODELS", "create_model", "import_torch"]
