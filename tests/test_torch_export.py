"""The PyTorch export computes the same logits as the Flax model, at even and odd image sizes (torch comes with the [test] extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_advprune.models import create_model
from jax_advprune.models.torch_export import to_torch
from jax_advprune.models.torch_reference import SameConv2d


def test_same_padding_puts_the_odd_pixel_last():
    conv = SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        even = conv(torch.ones(1, 1, 16, 16))  # XLA pads (0, 1): the first output window covers rows 0..2, all real
        odd = conv(torch.ones(1, 1, 15, 15))  # (1, 1)
    assert even.shape[-1] == 8 and float(even[0, 0, 0, 0]) == 9.0 and float(even[0, 0, -1, -1]) == 4.0
    assert odd.shape[-1] == 8 and float(odd[0, 0, 0, 0]) == 4.0 and float(odd[0, 0, -1, -1]) == 4.0


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("small_cnn", dict(widths=(8, 16, 32), mean=(0.4,), std=(0.3,)), (16, 16, 1)),
        ("small_cnn", dict(widths=(8, 16, 32), mean=(0.4,), std=(0.3,)), (15, 15, 1)),
        ("preact_resnet18", dict(width=8, activation="swish"), (16, 16, 3)),
        ("preact_resnet18", dict(width=4), (15, 15, 3)),
        ("wide_resnet", dict(depth=10, width=2, activation="swish"), (16, 16, 3)),
        ("wide_resnet", dict(depth=16, width=1, activation="relu"), (15, 15, 3)),
    ],
)
@pytest.mark.slow
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


@pytest.mark.parametrize("name,params", [("wrn28_10", 36_479_194), ("wrn34_10", 46_160_474), ("wrn70_16", 266_796_506)])
def test_wide_resnets_have_the_reference_parameter_counts(name, params):
    """The reference's WRN-28-10 has 36,479,194 parameters (10 classes); 34-10 46.2M, 70-16 266.8M."""
    model = create_model(name, num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["params"])) == params
