"""PyTorch versions of the models, with the reference implementations' module names (torch_keys.py).

Module-level classes, so `torch.save(module)` pickles them. Each takes NCHW
float images in [0, 1] and normalises inside with `mean` / `std`, held as
buffers that are not part of the state dict (the reference state dicts hold
none). Convolutions pad like XLA's 'SAME' (the odd pixel of a strided
convolution at the end), which for the even image sizes of CIFAR is exactly the
reference's padding: (1, 1, 1, 1) at stride 1 and (0, 1, 0, 1) at stride 2 in
the WideResNet, 1 on every side in the PreAct ResNet (whose Flax twin pads so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "swish": F.silu}


class SameConv2d(nn.Conv2d):
    """nn.Conv2d (no bias) that pads like XLA's 'SAME': out = ceil(in / stride), the odd pixel at the end."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class Normalized(nn.Module):
    """Base class: (x - mean) / std per channel, mean and std as non-persistent buffers."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x):
        return (x - self.mean) / self.std


class WideBlock(nn.Module):
    """The reference's `_Block`: BN-act, conv3x3(stride), BN-act, conv3x3, plus x or a 1x1 shortcut of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: str):
        super().__init__()
        self.activation = activation
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.conv_0 = SameConv2d(in_planes, out_planes, 3, stride)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=0.01)
        self.conv_1 = SameConv2d(out_planes, out_planes, 3, 1)
        self.shortcut = SameConv2d(in_planes, out_planes, 1, stride) if in_planes != out_planes else None

    def forward(self, x):
        act = ACTIVATIONS[self.activation]
        activated = act(self.batchnorm_0(x))
        out = self.conv_1(act(self.batchnorm_1(self.conv_0(activated))))
        return (self.shortcut(activated) if self.shortcut is not None else x) + out


class WideBlockGroup(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, activation: str):
        super().__init__()
        self.block = nn.Sequential(
            *[
                WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation)
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.block(x)


class WideResNet(Normalized):
    """The DM-Improves-AT / Gowal et al. WideResNet-depth-width (keys init_conv, layer.<g>.block.<b>, batchnorm, logits)."""

    def __init__(self, num_classes=10, depth=28, width=10, activation="swish", mean=(0.0,), std=(1.0,), in_channels=3):
        super().__init__(mean, std)
        self.activation = activation
        channels = [16, 16 * width, 32 * width, 64 * width]
        blocks = (depth - 4) // 6
        self.init_conv = SameConv2d(in_channels, channels[0], 3, 1)
        self.layer = nn.Sequential(
            *[
                WideBlockGroup(blocks, channels[g], channels[g + 1], stride, activation)
                for g, stride in enumerate((1, 2, 2))
            ]
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=0.01)
        self.logits = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.layer(self.init_conv(self.normalize(x)))
        return self.logits(ACTIVATIONS[self.activation](self.batchnorm(out)).mean(dim=(2, 3)))


class PreActBlock(nn.Module):
    """The reference's PreActBlock: BN-act, conv3x3(stride), BN-act, conv3x3, plus x or a 1x1 shortcut (`shortcut.0`)."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str):
        super().__init__()
        self.activation = activation
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        act = ACTIVATIONS[self.activation]
        out = act(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(act(self.bn2(self.conv1(out)))) + shortcut


class PreActResNet(Normalized):
    """The DM-Improves-AT PreAct ResNet (keys conv1, layer1..4, bn, linear); width 64 is the standard net."""

    def __init__(
        self, num_classes=10, blocks=(2, 2, 2, 2), width=64, activation="relu", mean=(0.0,), std=(1.0,), in_channels=3
    ):
        super().__init__(mean, std)
        self.activation = activation
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        in_planes = width
        for stage, count in enumerate(blocks):
            planes = width * 2**stage
            layers = []
            for i in range(count):
                layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1, activation))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        for stage in range(self.num_stages):
            out = getattr(self, f"layer{stage + 1}")(out)
        return self.linear(ACTIVATIONS[self.activation](self.bn(out)).mean(dim=(2, 3)))


class SmallCNN(Normalized):
    """This project's SmallCNN: conv3x3 (stride 1, then 2) -> BN -> ReLU blocks, global mean, dense `head`."""

    def __init__(self, num_classes=10, widths=(32, 64, 128), mean=(0.5,), std=(0.25,), in_channels=1):
        super().__init__(mean, std)
        channels = [in_channels] + list(widths)
        for i in range(len(widths)):
            setattr(self, f"conv{i}", SameConv2d(channels[i], channels[i + 1], 3, 1 if i == 0 else 2))
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels[i + 1]))
        self.num_layers = len(widths)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.normalize(x)
        for i in range(self.num_layers):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.head(x.mean(dim=(2, 3)))


def reference_module(model, in_channels: int) -> nn.Module:
    """The PyTorch architecture of a Flax SmallCNN, PreActResNet or WideResNet (same hyperparameters, fresh weights)."""
    kind = type(model).__name__
    common = dict(num_classes=model.num_classes, mean=tuple(model.mean), std=tuple(model.std), in_channels=in_channels)
    if kind == "WideResNet":
        return WideResNet(depth=model.depth, width=model.width, activation=model.activation, **common)
    if kind == "PreActResNet":
        return PreActResNet(blocks=tuple(model.blocks), width=model.width, activation=model.activation, **common)
    if kind == "SmallCNN":
        return SmallCNN(widths=tuple(model.widths), **common)
    raise ValueError(f"no PyTorch architecture for {kind}; available: SmallCNN, PreActResNet, WideResNet")
