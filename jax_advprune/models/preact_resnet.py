"""PreAct ResNet-18 (He et al. 2016, identity mappings), as in the DM-Improves-AT code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jax_advprune.models.layers import Conv

ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}


# The reference pads every 3x3 convolution by 1 on each side (PyTorch's padding=1): at stride 2 that
# is not XLA's 'SAME', which puts the odd pixel at the end.
PAD_1 = ((1, 1), (1, 1))


BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch


class PreActBlock(nn.Module):
    """BN-act-conv3x3(stride)-BN-act-conv3x3 plus a shortcut (1x1 conv when the shape changes), padded as the reference."""

    planes: int
    stride: int
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        act = ACTIVATIONS[self.activation]
        out = act(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name="bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = Conv(
                self.planes,
                (1, 1),
                strides=self.stride,
                padding="VALID",
                use_bias=False,
                dtype=self.dtype,
                name="shortcut",
            )(out)
        out = Conv(
            self.planes, (3, 3), strides=self.stride, padding=PAD_1, use_bias=False, dtype=self.dtype, name="conv1"
        )(out)
        out = act(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name="bn2")(out))
        out = Conv(self.planes, (3, 3), padding=PAD_1, use_bias=False, dtype=self.dtype, name="conv2")(out)
        return out + shortcut


class PreActResNet(nn.Module):
    """PreAct ResNet: conv3x3, four stages of PreActBlocks, BN-act, global average pool, dense.

    Input: images (B, H, W, C) float32 in [0, 1], normalised inside with `mean` / `std`.
    Output: logits (B, num_classes) float32. `width` scales the stage widths (64 = the
    standard net). `dtype` is the compute dtype; parameters stay float32.
    With `return_features`: (logits, penultimate features (B, 8 * width)).
    """

    bn_momentum: ClassVar[float] = BN_MOMENTUM  # read by the train step (train.first_step_batch_stats)
    num_classes: int = 10
    blocks: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    activation: str = "relu"
    mean: Sequence[float] = (0.4914, 0.4822, 0.4465)
    std: Sequence[float] = (0.2471, 0.2435, 0.2616)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = ((x - jnp.asarray(self.mean)) / jnp.asarray(self.std)).astype(self.dtype)
        x = Conv(self.width, (3, 3), padding=PAD_1, use_bias=False, dtype=self.dtype, name="stem")(x)
        for stage, count in enumerate(self.blocks):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                x = PreActBlock(
                    self.width * 2**stage, stride, self.activation, self.dtype, name=f"stage{stage}_block{i}"
                )(x, train)
        bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, dtype=self.dtype, name="bn_final")
        features = jnp.mean(ACTIVATIONS[self.activation](bn(x)), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features).astype(jnp.float32)
        return (logits, features.astype(jnp.float32)) if return_features else logits


def preact_resnet18(**kwargs) -> PreActResNet:
    return PreActResNet(blocks=(2, 2, 2, 2), **kwargs)
