"""Export Flax models to equivalent PyTorch modules (same weights, same outputs).

Used by the benchmarks to run PyTorch attack libraries on exactly our model, and
by users who want our trained models in PyTorch. PyTorch is an optional
dependency (`pip install -e ".[bench]"`); it is imported here only.

The PyTorch modules take NCHW float images in [0, 1] (PyTorch's convention) and
return logits; they are in eval mode (BatchNorm running averages).
XLA's 'SAME' padding puts the odd pixel of a strided convolution at the end;
the exported convolutions pad explicitly in the same way.
"""

from __future__ import annotations

import numpy as np


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA 'SAME' padding (low, high) of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _torch_layers():
    """The PyTorch building blocks, defined on first use (torch is optional)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SameConv(nn.Module):
        """A bias-free Flax nn.Conv (HWIO kernel, 'SAME' padding) on NCHW inputs of size (H, W)."""

        def __init__(self, kernel, stride: int, in_hw: tuple[int, int]):
            super().__init__()
            kernel = np.asarray(kernel)
            k = kernel.shape[0]
            self.conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], k, stride=stride, padding=0, bias=False)
            self.conv.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
            pad_h, pad_w = _same_padding(in_hw[0], k, stride), _same_padding(in_hw[1], k, stride)
            self.pad = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
            self.out_hw = (-(-in_hw[0] // stride), -(-in_hw[1] // stride))

        def forward(self, x):
            return self.conv(F.pad(x, self.pad))

    def batch_norm(params, stats):
        bn = nn.BatchNorm2d(len(np.asarray(params["scale"])), eps=1e-5)
        bn.weight.data = torch.tensor(np.asarray(params["scale"]))
        bn.bias.data = torch.tensor(np.asarray(params["bias"]))
        bn.running_mean.data = torch.tensor(np.asarray(stats["mean"]))
        bn.running_var.data = torch.tensor(np.asarray(stats["var"]))
        return bn

    def dense(params):
        layer = nn.Linear(*np.asarray(params["kernel"]).shape)
        layer.weight.data = torch.tensor(np.asarray(params["kernel"]).T.copy())
        layer.bias.data = torch.tensor(np.asarray(params["bias"]))
        return layer

    def normalizer(mean, std):
        mean_t = torch.tensor(np.asarray(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(np.asarray(std), dtype=torch.float32).view(1, -1, 1, 1)
        return lambda x: (x - mean_t) / std_t

    return torch, F, nn, SameConv, batch_norm, dense, normalizer


def small_cnn_to_torch(model, variables: dict, image_shape: tuple[int, int, int]):
    """A torch.nn.Module computing `model.apply(variables, x, train=False)` for a SmallCNN.

    image_shape: (H, W, C) of the inputs, needed for the explicit 'SAME' padding.
    """
    _, F, nn, SameConv, batch_norm, dense, normalizer = _torch_layers()
    params, stats = variables["params"], variables["batch_stats"]

    class TorchSmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = normalizer(model.mean, model.std)
            self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
            hw = tuple(image_shape[:2])
            for i in range(len(model.widths)):
                conv = SameConv(params[f"conv{i}"]["kernel"], 1 if i == 0 else 2, hw)
                hw = conv.out_hw
                self.convs.append(conv)
                self.bns.append(batch_norm(params[f"bn{i}"], stats[f"bn{i}"]))
            self.head = dense(params["head"])

        def forward(self, x):
            x = self.normalize(x)
            for conv, bn in zip(self.convs, self.bns):
                x = F.relu(bn(conv(x)))
            return self.head(x.mean(dim=(2, 3)))

    return TorchSmallCNN().eval()


def _residual_to_torch(model, variables: dict, image_shape: tuple[int, int, int], blocks: list[tuple[str, int]], layer_names: tuple[str, str, str, str]):
    """Shared exporter of the pre-activation residual nets (PreActResNet, WideResNet).

    Both compute stem conv -> blocks -> BN-act -> global mean -> dense, where a block is
    act(bn_a(x)) -> conv_a(stride) -> act(bn_b) -> conv_b, plus x or a 1x1 shortcut of
    act(bn_a(x)). `blocks`: (Flax block name, stride) in order; `layer_names`: the
    block's (bn_a, conv_a, bn_b, conv_b) parameter names.
    """
    _, F, nn, SameConv, batch_norm, dense, normalizer = _torch_layers()
    params, stats = variables["params"], variables["batch_stats"]
    activation = {"relu": F.relu, "swish": F.silu}[model.activation]
    bn_a, conv_a, bn_b, conv_b = layer_names

    class Block(nn.Module):
        def __init__(self, name: str, stride: int, hw):
            super().__init__()
            p, st = params[name], stats[name]
            self.bn_a, self.bn_b = batch_norm(p[bn_a], st[bn_a]), batch_norm(p[bn_b], st[bn_b])
            self.conv_a = SameConv(p[conv_a]["kernel"], stride, hw)
            self.conv_b = SameConv(p[conv_b]["kernel"], 1, self.conv_a.out_hw)
            self.shortcut = SameConv(p["shortcut"]["kernel"], stride, hw) if "shortcut" in p else None
            self.out_hw = self.conv_a.out_hw

        def forward(self, x):
            activated = activation(self.bn_a(x))
            out = self.conv_b(activation(self.bn_b(self.conv_a(activated))))
            return (self.shortcut(activated) if self.shortcut is not None else x) + out

    class TorchResidualNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = normalizer(model.mean, model.std)
            self.stem = SameConv(params["stem"]["kernel"], 1, tuple(image_shape[:2]))
            hw, layers = self.stem.out_hw, []
            for name, stride in blocks:
                layers.append(Block(name, stride, hw))
                hw = layers[-1].out_hw
            self.blocks = nn.Sequential(*layers)
            self.bn_final = batch_norm(params["bn_final"], stats["bn_final"])
            self.head = dense(params["head"])

        def forward(self, x):
            x = self.blocks(self.stem(self.normalize(x)))
            return self.head(activation(self.bn_final(x)).mean(dim=(2, 3)))

    return TorchResidualNet().eval()


def preact_resnet_to_torch(model, variables: dict, image_shape: tuple[int, int, int]):
    """A torch.nn.Module computing `model.apply(variables, x, train=False)` for a PreActResNet."""
    blocks = [(f"stage{stage}_block{i}", 2 if stage > 0 and i == 0 else 1) for stage, count in enumerate(model.blocks) for i in range(count)]
    return _residual_to_torch(model, variables, image_shape, blocks, ("bn1", "conv1", "bn2", "conv2"))


def wide_resnet_to_torch(model, variables: dict, image_shape: tuple[int, int, int]):
    """A torch.nn.Module computing `model.apply(variables, x, train=False)` for a WideResNet."""
    per_group = (model.depth - 4) // 6
    blocks = [(f"group{group}_block{i}", stride if i == 0 else 1) for group, stride in enumerate((1, 2, 2)) for i in range(per_group)]
    return _residual_to_torch(model, variables, image_shape, blocks, ("bn0", "conv0", "bn1", "conv1"))


EXPORTERS = {"SmallCNN": small_cnn_to_torch, "PreActResNet": preact_resnet_to_torch, "WideResNet": wide_resnet_to_torch}


def to_torch(model, variables: dict, image_shape: tuple[int, int, int]):
    """Exports a registered Flax model (by class) to PyTorch; see the module docstring."""
    name = type(model).__name__
    if name not in EXPORTERS:
        raise ValueError(f"no PyTorch exporter for {name}; available: {sorted(EXPORTERS)}")
    return EXPORTERS[name](model, variables, image_shape)
