"""The PyTorch export computes the same logits as the Flax model (torch comes with the [test] extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_advprune.models import create_model
from jax_advprune.models.torch_export import _same_padding, to_torch


def test_same_padding_puts_the_odd_pixel_last():
    assert _same_padding(16, 3, 2) == (0, 1)
    assert _same_padding(15, 3, 2) == (1, 1)
    assert _same_padding(16, 3, 1) == (1, 1)


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("small_cnn", dict(widths=(8, 16, 32), mean=(0.4,), std=(0.3,)), (16, 16, 1)),
        ("small_cnn", dict(widths=(8, 16, 32), mean=(0.4,), std=(0.3,)), (15, 15, 1)),
        ("preact_resnet18", dict(width=8, activation="swish"), (16, 16, 3)),
    ],
)
def test_export_matches_flax(name, kwargs, shape):
    model = create_model(name, num_classes=10, **kwargs)
    x = np.random.default_rng(0).uniform(0, 1, (6,) + shape).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
    # non-trivial BatchNorm statistics
    _, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    exported = to_torch(model, variables, x.shape[1:])
    with torch.no_grad():
        ours = exported(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ours, np.asarray(model.apply(variables, x)), atol=1e-4)
