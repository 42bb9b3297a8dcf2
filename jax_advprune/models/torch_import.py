"""PyTorch checkpoints into the Flax models: DM-Improves-AT / Gowal et al. / RobustBench WideResNets, PreAct ResNet-18.

`import_torch(path_or_state_dict, name=..., **model_kwargs) -> (module, variables)`
reads `.pt`/`.pth` files (a bare state dict, or one under `model_state_dict` or
`state_dict`) and `.safetensors` files, strips the wrappers training scripts add
to the keys (`module.` from DataParallel, the `0.`/`1.` of DM-Improves-AT's
`Sequential([Normalization,] backbone)`), maps the reference keys
(torch_keys.py) and checks every key and shape. The reference state dicts do not
hold the normalisation constants: they come from `dataset` (cifar10, cifar100,
svhn) or from `mean` / `std` keyword arguments.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune.models import create_model
from jax_advprune.models.torch_keys import variables_from_state_dict

# The constants of the DM-Improves-AT code (core/models/wideresnetwithswish.py).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0,), (1.0,)),
}
# What the reference architectures do when no dataset is named: its WideResNets normalise
# with the CIFAR-10 constants, its PreAct ResNet does not normalise (train.py's --normalize is off).
# (This project's SmallCNN, exported by it, keeps its own defaults.)
DEFAULT_DATASET = {
    "wide_resnet": "cifar10",
    "wrn28_10": "cifar10",
    "wrn34_10": "cifar10",
    "wrn70_16": "cifar10",
    "preact_resnet18": "none",
}
IMPORTABLE = tuple(DEFAULT_DATASET) + ("small_cnn",)


def load_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
    """{key: float or int array} from a checkpoint file or an in-memory dict, wrappers stripped."""
    state = path_or_state_dict
    if isinstance(state, (str, os.PathLike)):
        path = os.fspath(state)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            state = load_file(path)
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    arrays = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in state.items()}
    return strip_wrappers(arrays)


def strip_wrappers(state: dict) -> dict:
    """Removes `module.` prefixes and a leading Sequential index shared by the backbone's keys (Normalization keys dropped)."""
    state = {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}
    indexed = [k for k in state if re.match(r"^\d+\.", k)]
    if indexed and len(indexed) == len(state):
        backbone = max({k.split(".", 1)[0] for k in indexed}, key=lambda i: sum(k.startswith(i + ".") for k in indexed))
        state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(backbone + ".")}
    return state


def import_torch(
    path_or_state_dict,
    *,
    name: str,
    num_classes: int = 10,
    dataset: str | None = None,
    image_shape=(32, 32, 3),
    **model_kwargs,
):
    """(Flax module, variables) holding a PyTorch checkpoint's weights and BatchNorm statistics.

    name: 'wide_resnet' (with depth, width, activation 'relu' | 'swish'), 'wrn28_10',
    'wrn34_10', 'wrn70_16', 'preact_resnet18' (or 'small_cnn', exported by this
    project). dataset: where mean/std come from (cifar10, cifar100, svhn, none;
    default: what the reference architecture does); `mean` / `std` in model_kwargs
    override it. image_shape: (H, W, C) of the inputs.
    """
    if name not in IMPORTABLE:
        raise ValueError(f"cannot import PyTorch checkpoints into {name!r}; importable: {', '.join(IMPORTABLE)}")
    dataset = dataset or DEFAULT_DATASET.get(name)
    if dataset is not None and dataset not in NORMALIZATION:
        raise ValueError(
            f"dataset {dataset!r} has no normalisation constants; known: {', '.join(NORMALIZATION)}, or pass mean= and std="
        )
    if dataset is not None:
        mean, std = NORMALIZATION[dataset]
        model_kwargs = {"mean": mean, "std": std} | model_kwargs
    model = create_model(name, num_classes=num_classes, **model_kwargs)
    like = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
    variables = variables_from_state_dict(model, load_state_dict(path_or_state_dict), like)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)
