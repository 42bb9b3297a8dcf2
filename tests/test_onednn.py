"""oneDNN convolutions (jax_advprune.kernels.onednn) against lax.conv_general_dilated."""

import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_advprune import parallel
from jax_advprune.kernels import onednn

DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# The [test] extra installs oneDNN on Linux x86-64 (the only platform with its wheels), so there only a missing
# C++ compiler skips and a failed build fails the tests; elsewhere (macOS, aarch64) the custom call cannot exist.
ONEDNN_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"
pytestmark = [
    pytest.mark.skipif(not ONEDNN_PLATFORM, reason="oneDNN's wheels are for Linux x86-64 only; convolutions are XLA's here"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler to build the custom call"),
]


def test_the_custom_call_builds_and_registers():
    assert onednn.available(), onednn._register()


def _loss(conv, x, w, strides, padding):
    """A nonlinear scalar of the convolution, so that gradients depend on every output."""
    return jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=DIMENSIONS)))


@pytest.mark.parametrize(
    "size, cin, cout, kernel, stride, padding",
    [
        (16, 3, 8, 3, 1, "SAME"),  # first layer of the models
        (9, 4, 6, 3, 2, "SAME"),  # odd size, stride 2: XLA pads (1, 1)
        (8, 4, 6, 3, 2, "SAME"),  # even size, stride 2: XLA pads (0, 1), PyTorch would pad (1, 1)
        (8, 4, 6, 3, 2, "VALID"),
        (8, 4, 6, 3, 1, ((2, 1), (0, 1))),  # explicit, asymmetric
        (8, 5, 7, 1, 2, "SAME"),  # 1x1 strided shortcut
        (7, 3, 5, 5, 1, "SAME"),
    ],
)
def test_forward_and_gradients_equal_lax(size, cin, cout, kernel, stride, padding):
    rng = np.random.default_rng(size * cin + stride)
    x = jnp.asarray(rng.standard_normal((4, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32) / np.sqrt(kernel * kernel * cin))
    strides = (stride, stride)
    expected = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMENSIONS)
    got = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMENSIONS))(x, w)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda x, w: _loss(onednn.conv_general_dilated, x, w, strides, padding), (0, 1)))(x, w)
    expected_grads = jax.grad(lambda x, w: _loss(lax.conv_general_dilated, x, w, strides, padding), (0, 1))(x, w)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _sharded_step(conv_backend: str):
    """jit over 4 devices with the batch sharded, as the train step does: value and kernel gradient of a 2-layer net."""
    onednn.set_backend(conv_backend)
    mesh = parallel.make_mesh(4)

    conv = onednn.conv_general_dilated

    def loss(x, w1, w2):
        h = jax.nn.relu(conv(x, w1, (2, 2), "SAME", dimension_numbers=DIMENSIONS))
        return jnp.mean(conv(h, w2, (1, 1), "SAME", dimension_numbers=DIMENSIONS) ** 2)

    fn = jax.jit(
        jax.value_and_grad(loss, (0, 1, 2)),
        in_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh), parallel.replicated(mesh)),
    )
    return fn, mesh


def test_sharded_jit_runs_per_device_and_equals_lax():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 12, 12, 3), np.float32)
    w1 = rng.standard_normal((3, 3, 3, 8), np.float32) / 5
    w2 = rng.standard_normal((3, 3, 8, 4), np.float32) / 8
    try:
        results, hlo = {}, None
        for backend in ("onednn", "xla"):
            fn, mesh = _sharded_step(backend)  # no mesh context: the partitioner asks the custom call how to split
            results[backend] = fn(x, w1, w2)
            if backend == "onednn":
                hlo = fn.lower(x, w1, w2).compile().as_text()
    finally:
        onednn.set_backend("auto")
    assert onednn.TARGET in hlo
    assert "all-gather" not in hlo  # each device convolves its own rows; only the kernel gradients are summed
    (value, grads), (expected_value, expected_grads) = results["onednn"], results["xla"]
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
    # Rows that do not divide over the 4 devices (6 of the 8) are gathered and convolved whole: the same numbers.
    mesh = parallel.make_mesh(4)
    sliced = lambda conv: jax.jit(lambda x, w: conv(x[:6], w, (1, 1), "SAME", dimension_numbers=DIMENSIONS),  # noqa: E731
                                  in_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))
    np.testing.assert_allclose(sliced(onednn.conv_general_dilated)(x, w1), sliced(lax.conv_general_dilated)(x, w1), rtol=1e-5, atol=1e-6)


def test_what_onednn_does_not_cover_goes_to_lax():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def hlo(fn, *args):
        return jax.jit(fn).lower(*args).as_text()

    plain = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS)  # noqa: E731
    assert onednn.TARGET in hlo(plain, x, w)
    assert onednn.TARGET not in hlo(plain, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # float32 only
    dilated = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMENSIONS)  # noqa: E731
    assert onednn.TARGET not in hlo(dilated, x, w)
    nchw = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))  # noqa: E731
    assert onednn.TARGET not in hlo(nchw, jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3)))
    try:
        onednn.set_backend("xla")  # read when a function is traced: a new function, not `plain` (its trace is cached)
        assert onednn.TARGET not in hlo(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS), x, w)
    finally:
        onednn.set_backend("auto")
    with pytest.raises(ValueError, match="must be one of"):
        onednn.set_backend("mkl")


def test_missing_onednn_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path))
    with pytest.raises(onednn.OnednnUnavailableError, match=r"jax_advprune\[cpu\]"):
        onednn.onednn_prefix()


def test_vmapped_vjps_and_batched_kernels_equal_lax():
    """DeepFool's pattern (one VJP per candidate class, vmapped over cotangents) and vmap over kernels."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 8, 8, 4), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 5), np.float32) / 6)
    cotangents = jnp.asarray(rng.standard_normal((6, 3, 4, 4, 5), np.float32))
    results = {}
    for name, conv in (("lax", lax.conv_general_dilated), ("onednn", onednn.conv_general_dilated)):
        strided = lambda x, k: conv(x, k, (2, 2), "SAME", dimension_numbers=DIMENSIONS)  # noqa: E731
        _, vjp = jax.vjp(lambda x_: jnp.tanh(strided(x_, w)), x)
        input_grads = jax.jit(jax.vmap(lambda c: vjp(c)[0]))(cotangents)  # images mapped, kernel not: folded into the batch
        per_kernel = jax.jit(jax.vmap(lambda k: strided(x, k)))(jnp.stack([w, -2 * w]))  # kernel mapped: one call per kernel
        kernel_grads = jax.jit(jax.vmap(lambda c: jax.grad(lambda k: jnp.sum(strided(x, k) * c))(w)))(cotangents)
        results[name] = (input_grads, per_kernel, kernel_grads)
    for got, expected in zip(results["onednn"], results["lax"]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_users_lax_conv_function_is_routed_to_onednn_with_equal_values_and_gradients():
    """kernels.onednn_route: a plain function with lax.conv_general_dilated (one inside a nested jit, one strided,
    one dilated that oneDNN does not take) gives the same logits and input gradients, now with the custom call."""
    from jax_advprune.kernels.onednn_route import with_onednn_convolutions

    def user_model(params, x):
        h = jax.nn.relu(lax.conv_general_dilated(x, params["a"], (1, 1), "SAME", dimension_numbers=DIMENSIONS))
        h = jax.jit(lambda z: lax.conv_general_dilated(z, params["b"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS))(h)
        h = lax.conv_general_dilated(h, params["c"], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMENSIONS)
        return {"logits": h.mean(axis=(1, 2))}

    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in (("a", (3, 3, 3, 8)), ("b", (3, 3, 8, 8)), ("c", (3, 3, 8, 5)))}
    x = rng.uniform(size=(4, 10, 10, 3)).astype(np.float32)
    routed = with_onednn_convolutions(user_model)
    assert routed is with_onednn_convolutions(user_model)  # one wrapper per function: jit caches keep hitting
    text = str(jax.make_jaxpr(routed)(params, x))
    assert text.count("onednn") >= 2 and "conv_general_dilated" in text  # the dilated one stays XLA's
    np.testing.assert_allclose(routed(params, x)["logits"], user_model(params, x)["logits"], rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda f, z: jnp.sum(jnp.sin(f(params, z)["logits"])), argnums=1)
    np.testing.assert_allclose(grad(routed, x), grad(user_model, x), rtol=1e-4, atol=1e-5)
