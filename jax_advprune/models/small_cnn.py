"""A small strided CNN: the CPU-sized model of tests, smoke runs and the embedded default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jax_advprune.models.layers import Conv

BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch


class SmallCNN(nn.Module):
    """conv3x3 blocks (BatchNorm, ReLU), stride 2 after the first, global average pool, dense.

    Strided convolutions instead of max-pooling: XLA:CPU differentiates
    max-pool (select-and-scatter) very slowly, and attacks live on input gradients.

    Input: images (B, H, W, C) float32 in [0, 1]; normalised inside with
    `mean` / `std` (per channel). Output: logits (B, num_classes) float32.
    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32.
    With `return_features`: (logits, penultimate features (B, widths[-1])).
    """

    bn_momentum: ClassVar[float] = BN_MOMENTUM  # read by the train step (train.first_step_batch_stats)
    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.25,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = ((x - jnp.asarray(self.mean)) / jnp.asarray(self.std)).astype(self.dtype)
        for i, width in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            x = Conv(width, (3, 3), strides=(stride, stride), use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name=f"bn{i}")(x)
            x = nn.relu(x)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features).astype(jnp.float32)
        return (logits, features.astype(jnp.float32)) if return_features else logits
