"""WideResNet-depth-width with ReLU or Swish, as in the DM-Improves-AT reference (Gowal et al. 2020 variant).

WRN-28-10, WRN-34-10 and WRN-70-16 are the networks of the papers; WRN-16-4 and
smaller are CPU-sized. Normalization is inside the model, BatchNorm momentum is
the reference's 0.01 (Flax: 0.99), convolutions are He-initialised from the fan-out
and the last layer's bias starts at zero, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jax_advprune.models.layers import Conv
from jax_advprune.models.preact_resnet import ACTIVATIONS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # N(0, 2 / (k*k*out))
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # PyTorch's Linear default


BN_MOMENTUM = 0.99  # Flax convention: running = momentum * running + (1 - momentum) * batch


class WideBlock(nn.Module):
    """BN-act then conv3x3(stride)-BN-act-conv3x3; a 1x1 shortcut on the activated input when widths differ."""

    planes: int
    stride: int
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        act = ACTIVATIONS[self.activation]
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name=name)  # noqa: E731
        conv = lambda planes, k, stride, name: Conv(  # noqa: E731
            planes,
            (k, k),
            strides=stride,
            padding="SAME",
            use_bias=False,
            kernel_init=_conv_init,
            dtype=self.dtype,
            name=name,
        )
        has_shortcut = x.shape[-1] != self.planes
        activated = act(bn("bn0")(x))
        out = conv(self.planes, 3, self.stride, "conv0")(activated)
        out = act(bn("bn1")(out))
        out = conv(self.planes, 3, 1, "conv1")(out)
        shortcut = conv(self.planes, 1, self.stride, "shortcut")(activated) if has_shortcut else x
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-width: conv3x3(16), three groups of (depth - 4) / 6 blocks (16w, 32w, 64w; strides 1, 2, 2),
    BN-act, global average pool, dense.

    Input: images (B, H, W, C) float32 in [0, 1]; output: logits (B, num_classes) float32.
    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32.
    With `return_features`: (logits, penultimate features (B, 64 * width)).
    """

    bn_momentum: ClassVar[float] = BN_MOMENTUM  # read by the train step (train.first_step_batch_stats)
    num_classes: int = 10
    depth: int = 28
    width: int = 10
    activation: str = "swish"
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
        blocks = (self.depth - 4) // 6
        x = ((x - jnp.asarray(self.mean)) / jnp.asarray(self.std)).astype(self.dtype)
        x = Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="stem")(x)
        for group, (planes, stride) in enumerate(zip((16 * self.width, 32 * self.width, 64 * self.width), (1, 2, 2))):
            for i in range(blocks):
                x = WideBlock(
                    planes, stride if i == 0 else 1, self.activation, self.dtype, name=f"group{group}_block{i}"
                )(x, train)
        x = ACTIVATIONS[self.activation](
            nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name="bn_final")(x)
        )
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype, name="head")(features).astype(
            jnp.float32
        )
        return (logits, features.astype(jnp.float32)) if return_features else logits


def wide_resnet(depth: int = 28, width: int = 10, **kwargs) -> WideResNet:
    return WideResNet(depth=depth, width=width, **kwargs)
