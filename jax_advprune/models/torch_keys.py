"""Flax variables <-> PyTorch state dicts with the reference implementations' keys (numpy only, no torch).

The keys are those of the DM-Improves-AT code (the WideResNet of Gowal et al.
that RobustBench's CIFAR models share, and its PreAct ResNet-18), so a state
dict exported here loads into those architectures and their checkpoints import:

  WideResNet     init_conv, layer.<g>.block.<b>.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, batchnorm, logits
  PreActResNet   conv1, layer<s>.<b>.{bn1, conv1, bn2, conv2, shortcut.0}, bn, linear
  SmallCNN       conv<i>, bn<i>, head (this project's own model)

Layouts: convolution kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in),
BatchNorm scale/bias/mean/var <-> weight/bias/running_mean/running_var (plus
num_batches_tracked, which PyTorch's strict loading expects).
"""

from __future__ import annotations

import numpy as np

from jax_advprune.errors import UserError


def _residual_block(
    ref: str, flax: str, ref_names: tuple[str, ...], flax_names: tuple[str, ...]
) -> list[tuple[str, tuple[str, ...], str]]:
    """The entries of one pre-activation block, layers (bn_a, conv_a, bn_b, conv_b, optional 1x1 shortcut) named
    `ref_names` under reference prefix `ref` and `flax_names` under Flax module `flax`."""
    return [
        (f"{ref}.{r}", (flax, f), k) for r, f, k in zip(ref_names, flax_names, ("bn", "conv", "bn", "conv", "conv?"))
    ]


def layer_map(model) -> list[tuple[str, tuple[str, ...], str]]:
    """[(reference key prefix, Flax module path, kind 'conv' | 'bn' | 'dense')] for a SmallCNN, PreActResNet or WideResNet."""
    kind = type(model).__name__
    if kind == "WideResNet":
        per_group = (model.depth - 4) // 6
        out = [("init_conv", ("stem",), "conv")]
        for g in range(3):
            for b in range(per_group):
                out += _residual_block(
                    f"layer.{g}.block.{b}",
                    f"group{g}_block{b}",
                    ("batchnorm_0", "conv_0", "batchnorm_1", "conv_1", "shortcut"),
                    ("bn0", "conv0", "bn1", "conv1", "shortcut"),
                )
        return out + [("batchnorm", ("bn_final",), "bn"), ("logits", ("head",), "dense")]
    if kind == "PreActResNet":
        out = [("conv1", ("stem",), "conv")]
        for s, count in enumerate(model.blocks):
            for b in range(count):
                out += _residual_block(
                    f"layer{s + 1}.{b}",
                    f"stage{s}_block{b}",
                    ("bn1", "conv1", "bn2", "conv2", "shortcut.0"),
                    ("bn1", "conv1", "bn2", "conv2", "shortcut"),
                )
        return out + [("bn", ("bn_final",), "bn"), ("linear", ("head",), "dense")]
    if kind == "SmallCNN":
        out = []
        for i in range(len(model.widths)):
            out += [(f"conv{i}", (f"conv{i}",), "conv"), (f"bn{i}", (f"bn{i}",), "bn")]
        return out + [("head", ("head",), "dense")]
    raise ValueError(f"no PyTorch key map for {kind}; available: SmallCNN, PreActResNet, WideResNet")


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def state_dict_from_variables(model, variables: dict) -> dict[str, np.ndarray]:
    """The reference state dict {key: array} of Flax `variables` (params, batch_stats) of `model`."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    out: dict[str, np.ndarray] = {}
    for prefix, path, kind in layer_map(model):
        p = _get(params, path)
        if p is None and kind == "conv?":
            continue
        if kind.startswith("conv"):
            out[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(p["kernel"]).transpose(3, 2, 0, 1))
        elif kind == "bn":
            s = _get(stats, path)
            out.update(
                {
                    f"{prefix}.weight": np.asarray(p["scale"]),
                    f"{prefix}.bias": np.asarray(p["bias"]),
                    f"{prefix}.running_mean": np.asarray(s["mean"]),
                    f"{prefix}.running_var": np.asarray(s["var"]),
                    f"{prefix}.num_batches_tracked": np.zeros((), np.int64),
                }
            )
        else:
            out[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(p["kernel"]).T)
            out[f"{prefix}.bias"] = np.asarray(p["bias"])
    return out


class StateDictMismatchError(UserError, ValueError):
    """A state dict does not hold the keys or shapes the model needs."""


def variables_from_state_dict(model, state: dict[str, np.ndarray], like: dict) -> dict:
    """Flax variables of `model` from a reference state dict, checked key by key and shape by shape against
    `like` (the model's initialised variables). Raises StateDictMismatchError listing what is missing or wrong."""
    params, stats, problems, used = {}, {}, [], set()

    def take(key: str, shape: tuple, transform=lambda a: a):
        if key not in state:
            problems.append(f"missing {key}")
            return np.zeros(shape, np.float32)
        used.add(key)
        value = transform(np.asarray(state[key], np.float32))
        if value.shape != tuple(shape):
            problems.append(f"{key}: shape {np.asarray(state[key]).shape}, expected {shape} after conversion")
        return value

    for prefix, path, kind in layer_map(model):
        expected = _get(like["params"], path)
        if expected is None:
            if kind == "conv?" and f"{prefix}.weight" in state:
                problems.append(f"unexpected {prefix}.weight (the model has no such layer)")
            continue
        if kind.startswith("conv"):
            _set(
                params,
                path + ("kernel",),
                take(f"{prefix}.weight", expected["kernel"].shape, lambda a: a.transpose(2, 3, 1, 0)),
            )
        elif kind == "bn":
            like_stats = _get(like["batch_stats"], path)
            _set(params, path + ("scale",), take(f"{prefix}.weight", expected["scale"].shape))
            _set(params, path + ("bias",), take(f"{prefix}.bias", expected["bias"].shape))
            _set(stats, path + ("mean",), take(f"{prefix}.running_mean", like_stats["mean"].shape))
            _set(stats, path + ("var",), take(f"{prefix}.running_var", like_stats["var"].shape))
            used.add(f"{prefix}.num_batches_tracked")
        else:
            _set(params, path + ("kernel",), take(f"{prefix}.weight", expected["kernel"].shape, lambda a: a.T))
            _set(params, path + ("bias",), take(f"{prefix}.bias", expected["bias"].shape))
    problems += [f"unexpected {key}" for key in sorted(set(state) - used)]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        prefixes = sorted({key.split(".")[0] for key in state})
        raise StateDictMismatchError(
            f"the state dict does not fit {type(model).__name__}: "
            + "; ".join(shown)
            + f". Its top-level keys are {', '.join(prefixes[:12])}: set model.name and model.kwargs (depth, width, activation) to "
            "describe the checkpoint's architecture (jax_advprune/models/torch_keys.py lists the keys of each)"
        )
    return {"params": params, "batch_stats": stats}
