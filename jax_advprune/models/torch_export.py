"""Flax models out to PyTorch: a picklable module (`to_torch`) and reference-keyed state dict files (`save_state_dict`).

PyTorch is optional (`[test]`, `[bench]` extras); it is imported here only. The
modules take NCHW float images in [0, 1] (PyTorch's convention), return logits
and are in eval mode (BatchNorm running averages); their state dicts hold the
reference implementations' keys (torch_keys.py), so they load into the
DM-Improves-AT / RobustBench architectures.
"""

from __future__ import annotations

import os

import numpy as np

from jax_advprune.models.torch_keys import state_dict_from_variables


def to_torch(model, variables: dict, image_shape: tuple[int, ...] | None = None):
    """A torch.nn.Module computing `model.apply(variables, x, train=False)` (x NCHW in PyTorch), picklable by torch.save.

    image_shape (H, W, C) gives the input channels (default: 3, or the SmallCNN's mean length).
    """
    import torch

    from jax_advprune.models.torch_reference import reference_module

    channels = (
        image_shape[-1]
        if image_shape is not None
        else np.asarray(variables["params"][_first_conv(model)]["kernel"]).shape[2]
    )
    module = reference_module(model, in_channels=channels)
    module.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict_from_variables(model, variables).items()}
    )
    return module.eval()


def _first_conv(model) -> str:
    return "conv0" if type(model).__name__ == "SmallCNN" else "stem"


def save_state_dict(state: dict[str, np.ndarray], path: str) -> None:
    """Writes a state dict as a PyTorch file (`torch.save` of tensors; any suffix but .safetensors) or `.safetensors`,
    atomically."""
    from jax_advprune.storage import atomic_output

    arrays = {k: np.array(v, order="C") for k, v in state.items()}  # writable copies (torch.from_numpy needs them)
    with atomic_output(path, os.path.splitext(path)[1]) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(arrays, tmp)
        else:
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)
