"""oneDNN convolutions (jax_advprune.kernels.onednn) against lax.conv_general_dilated.

Every test here loads the native custom call, so each runs in a child process (the `native` marker, conftest.py):
a crash fails the test that caused it, by name, and the suite goes on. The fuzz cases run in children of their own
(kernels.check), a few per process, and each case is a test of its own.
"""

import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_advprune import parallel
from jax_advprune.kernels import check, onednn

DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# The [test] extra installs oneDNN on Linux x86-64 (the only platform with its wheels), so there only a missing
# C++ compiler skips and a failed build fails the tests; elsewhere (macOS, aarch64) the custom call cannot exist.
ONEDNN_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"
HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
pytestmark = [
    pytest.mark.skipif(
        not ONEDNN_PLATFORM, reason="oneDNN's wheels are for Linux x86-64 only; convolutions are XLA's here"
    ),
    pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the custom call"),
]

# The fuzz subset: each case in one of four groups (1 or 4 devices; oneDNN's own ISA or capped at AVX2, the host
# class the heap corruption was seen on); the shapes of the known overrun in every group.
GROUPS = [(1, "native"), (4, "native"), (1, "AVX2"), (4, "AVX2")]
_SUBSET = check.fixed_subset()
_KNOWN = len(check.KNOWN_OVERRUNS)
FUZZ = [
    (group, case) for i, case in enumerate(_SUBSET) for group in (GROUPS if i < _KNOWN else [GROUPS[i % len(GROUPS)]])
]


@pytest.fixture(scope="module")
def fuzz_results():
    """{(devices, isa, case name): check.Result} for the subset, each group's cases run in its child processes."""
    results = {}
    for group in GROUPS:
        cases = [case for g, case in FUZZ if g == group]
        for result in check.run_cases(cases, devices=group[0], isa=group[1]):
            results[(*group, result.case.name)] = result
    return results


@pytest.mark.parametrize("group, case", FUZZ, ids=[f"{d}dev-{isa}-{case.name}" for (d, isa), case in FUZZ])
def test_fuzz_case_equals_lax_forward_gradients_and_sharded(fuzz_results, group, case):
    """Forward, both gradients and the sharded custom_partitioning path equal lax's; the custom call is in the program
    exactly when the route says oneDNN, and refused shapes (negative paddings) are XLA's (kernels/check.py)."""
    result = fuzz_results.get((*group, case.name))
    assert result is not None, "the case never ran"
    assert result.status == "ok", f"{result.status}: {result.message}"
    if case.kernel == 1 and case.strides != (1, 1) and result.route.startswith("oneDNN"):
        assert "subsampled" in result.route  # strided 1x1 never reaches oneDNN's strided path


@pytest.mark.native
def test_the_kernel_refuses_what_does_not_form_one_convolution():
    """plan_call runs the kernel's checks: each inconsistency is a refusal that says why, never a call."""
    assert onednn.available(), onednn._register()
    x, w, y = (4, 8, 8, 5), (3, 3, 5, 7), (4, 4, 4, 7)
    ok, impl = onednn.plan_call(0, x, w, y, (2, 2), ((0, 1), (0, 1)), 1)
    assert ok, impl
    for mode, shapes, strides, pads, why in [
        (0, (x, w, (4, 5, 4, 7)), (2, 2), ((0, 1), (0, 1)), "output size"),
        (0, (x, w, y), (2, 2), ((0, 2), (0, 1)), "paddings must be the ones the stride implies"),
        (0, (x, (3, 3, 6, 7), y), (2, 2), ((0, 1), (0, 1)), "channels or batch disagree"),
        (1, (y, w, (3, 8, 8, 5)), (2, 2), ((0, 1), (0, 1)), "channels or batch disagree"),
        (0, (x, w, y), (0, 2), ((0, 1), (0, 1)), "strides must be >= 1"),
        (0, (x, w, y), (2, 2), ((-1, 1), (0, 1)), "paddings must be >= 0"),
        (0, (x, (1, 1, 5, 7), y), (2, 2), ((0, 0), (0, 0)), "strided 1x1"),
        (0, ((4, 2, 2, 5), (5, 5, 5, 7), (4, 1, 1, 7)), (1, 1), ((0, 0), (0, 0)), "larger than the padded input"),
        (3, (x, w, y), (2, 2), ((0, 1), (0, 1)), "mode must be"),
    ]:
        ok, message = onednn.plan_call(mode, *shapes, strides, pads, 1)
        assert not ok and why in message, (mode, shapes, message)


@pytest.mark.native
def test_an_inconsistent_call_is_an_error_not_a_crash():
    """The custom call given paddings that do not match its buffers returns an error at run time (nothing written)."""
    assert onednn.available(), onednn._register()
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    wrong = jax.jit(
        lambda x, w: onednn._ffi_conv(0, x, w, (2, 4, 4, 4), (2, 2), ((0, 2), (0, 1)))
    )  # floor: 4 rows either way
    with pytest.raises(Exception, match="onednn_conv: bottom/right paddings"):
        jax.block_until_ready(wrong(x, w))
    mismatched = jax.jit(lambda x, w: onednn._ffi_conv(0, x, w, (2, 8, 8, 5), (1, 1), ((1, 1), (1, 1))))
    with pytest.raises(Exception, match="onednn_conv: channels or batch disagree"):
        jax.block_until_ready(mismatched(x, w))


@pytest.mark.native
def test_routes_are_logged_per_shape_and_refusals_go_to_xla(caplog):
    x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((1, 1, 3, 4))
    with caplog.at_level("INFO", logger=onednn.__name__):
        text = (
            jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=DIMENSIONS))
            .lower(x, w)
            .as_text()
        )
        negative = jax.jit(
            lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), ((-1, 0), (0, 0)), dimension_numbers=DIMENSIONS)
        )
        assert onednn.TARGET not in negative.lower(x, w).as_text()
    assert onednn.TARGET in text
    strided = onednn.ROUTES[((2, 9, 9, 3), (1, 1, 3, 4), (2, 2), ((0, 0), (0, 0)))]
    assert strided.backend == "oneDNN" and strided.subsampled and strided.strides == (1, 1)
    assert onednn.ROUTES[((2, 9, 9, 3), (1, 1, 3, 4), (1, 1), ((-1, 0), (0, 0)))] == onednn.Route(
        "XLA", "negative padding"
    )
    assert (
        "x (2, 9, 9, 3) * w (1, 1, 3, 4), strides (2, 2)" in caplog.text and "-> XLA: negative padding" in caplog.text
    )


@pytest.mark.slow
def test_checked_build_sees_the_known_overrun_and_reports_nothing_on_the_fixed_shapes():
    """The memory checker: the known overrun let through must be reported (positive control), and the kernel as built
    must give no sanitizer report or guard-page fault on the known shapes and a few others, AVX2 kernels, 4 devices."""
    control = check.positive_control()
    assert control.status in ("crash", "report") and (
        "AddressSanitizer" in control.message or "SEGV" in control.message
    ), control
    results = check.run_cases(_SUBSET[: _KNOWN + 3], devices=4, isa="AVX2", extra_env=check.sanitizer_environment())
    assert [r.status for r in results] == ["ok"] * (_KNOWN + 3), [
        (r.case.name, r.status, r.message) for r in results if r.status != "ok"
    ]


@pytest.mark.native
def test_the_custom_call_builds_and_registers():
    assert onednn.available(), onednn._register()


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


@pytest.mark.native
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

    def sliced(conv):
        return jax.jit(
            lambda x, w: conv(x[:6], w, (1, 1), "SAME", dimension_numbers=DIMENSIONS),
            in_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        )

    np.testing.assert_allclose(
        sliced(onednn.conv_general_dilated)(x, w1), sliced(lax.conv_general_dilated)(x, w1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.native
def test_what_onednn_does_not_cover_goes_to_lax():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def hlo(fn, *args):
        return jax.jit(fn).lower(*args).as_text()

    plain = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS)  # noqa: E731
    assert onednn.TARGET in hlo(plain, x, w)
    assert onednn.TARGET not in hlo(plain, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # float32 only

    def dilated(x, w):
        return onednn.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMENSIONS)

    assert onednn.TARGET not in hlo(dilated, x, w)
    nchw = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))  # noqa: E731
    assert onednn.TARGET not in hlo(nchw, jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3)))
    try:
        onednn.set_backend("xla")  # read when a function is traced: a new function, not `plain` (its trace is cached)
        assert onednn.TARGET not in hlo(
            lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS), x, w
        )
    finally:
        onednn.set_backend("auto")
    with pytest.raises(ValueError, match="must be one of"):
        onednn.set_backend("mkl")


def test_missing_onednn_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path))
    with pytest.raises(onednn.OnednnUnavailableError, match=r"jax_advprune\[cpu\]"):
        onednn.onednn_prefix()


@pytest.mark.native
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
        input_grads = jax.jit(jax.vmap(lambda c: vjp(c)[0]))(
            cotangents
        )  # images mapped, kernel not: folded into the batch
        per_kernel = jax.jit(jax.vmap(lambda k: strided(x, k)))(
            jnp.stack([w, -2 * w])
        )  # kernel mapped: one call per kernel
        kernel_grads = jax.jit(jax.vmap(lambda c: jax.grad(lambda k: jnp.sum(strided(x, k) * c))(w)))(cotangents)
        results[name] = (input_grads, per_kernel, kernel_grads)
    for got, expected in zip(results["onednn"], results["lax"]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.native
def test_a_users_lax_conv_function_is_routed_to_onednn_with_equal_values_and_gradients():
    """kernels.onednn_route: a plain function with lax.conv_general_dilated (one inside a nested jit, one strided,
    one dilated that oneDNN does not take) gives the same logits and input gradients, now with the custom call."""
    from jax_advprune.kernels.onednn_route import with_onednn_convolutions

    def user_model(params, x):
        h = jax.nn.relu(lax.conv_general_dilated(x, params["a"], (1, 1), "SAME", dimension_numbers=DIMENSIONS))
        h = jax.jit(
            lambda z: lax.conv_general_dilated(z, params["b"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS)
        )(h)
        h = lax.conv_general_dilated(h, params["c"], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMENSIONS)
        return {"logits": h.mean(axis=(1, 2))}

    rng = np.random.default_rng(0)
    params = {
        k: rng.normal(size=s).astype(np.float32) * 0.3
        for k, s in (("a", (3, 3, 3, 8)), ("b", (3, 3, 8, 8)), ("c", (3, 3, 8, 5)))
    }
    x = rng.uniform(size=(4, 10, 10, 3)).astype(np.float32)
    routed = with_onednn_convolutions(user_model)
    assert routed is with_onednn_convolutions(user_model)  # one wrapper per function: jit caches keep hitting
    text = str(jax.make_jaxpr(routed)(params, x))
    assert text.count("onednn") >= 2 and "conv_general_dilated" in text  # the dilated one stays XLA's
    np.testing.assert_allclose(routed(params, x)["logits"], user_model(params, x)["logits"], rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda f, z: jnp.sum(jnp.sin(f(params, z)["logits"])), argnums=1)
    np.testing.assert_allclose(grad(routed, x), grad(user_model, x), rtol=1e-4, atol=1e-5)


def test_the_per_model_choice_follows_the_measured_train_step_gains():
    """layers.MEASURED_GAIN is what benchmarks/train_step.py measured (oneDNN img/s over XLA-convolution img/s), per
    instruction set and model, and the choice follows the 10% rule."""
    import json

    from jax_advprune.models import layers

    families = {"small CNN": "small_cnn", "PreAct ResNet-18": "preact_resnet18", "WRN-16-4": "wide_resnet"}
    for isa, name in (("AVX-512", "train_step.json"), ("AVX2", "train_step_avx2.json")):
        with open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", name)) as f:
            result = json.load(f)
        assert result["machine"]["isa_effective"] == isa
        for row in result["rows"]:
            family = next(v for k, v in families.items() if row["model"].startswith(k))
            assert layers.MEASURED_GAIN[isa][family] == round(row["ours_img_s"] / row["ours_xla_conv_img_s"], 2), (
                isa,
                family,
            )


def test_choose_convolutions_gives_xla_where_onednn_gains_under_ten_percent(monkeypatch):
    from jax_advprune.models import layers

    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "host_isa", lambda: "AVX2")
    monkeypatch.setattr(layers, "describe_convolutions", lambda: "oneDNN custom call")  # nothing native in this process
    try:
        onednn.set_backend("auto")
        assert layers.choose_convolutions("wrn28_10").startswith(
            "XLA (oneDNN's gain for wide_resnet on an AVX2 host was 0.75x"
        )
        assert onednn.get_backend() == "xla"
        onednn.set_backend("onednn")  # an explicit choice is kept
        assert layers.choose_convolutions("wrn28_10") == "oneDNN custom call"
        onednn.set_backend("auto")
        monkeypatch.setattr(onednn, "host_isa", lambda: "AVX-512")
        assert layers.choose_convolutions("wrn28_10") == "oneDNN custom call" and onednn.get_backend() == "auto"
        assert layers.choose_convolutions("users_own_model") == "oneDNN custom call"  # a family nobody measured
        monkeypatch.setattr(onednn, "host_isa", lambda: "other")  # an instruction set nobody measured or fuzzed
        assert layers.choose_convolutions("small_cnn").startswith("XLA (oneDNN was neither measured nor fuzzed")
    finally:
        onednn.set_backend("xla")  # the pytest process's own setting (conftest)


def test_host_isa_reads_the_onednn_cap(monkeypatch):
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("reads /proc/cpuinfo")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert onednn.host_isa() in ("AVX2", "other")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    assert onednn.host_isa() == "other"


_DENORMAL_SCRIPT = """
import jax, jax.numpy as jnp, torch
from jax import lax
from jax_advprune.kernels import onednn
torch.set_num_threads(2)
torch.nn.functional.conv2d(torch.ones(8, 3, 8, 8), torch.ones(4, 3, 3, 3), padding=1)  # PyTorch's team starts here
onednn.set_backend("onednn")
x, w = jnp.full((64, 32, 32, 16), 1e-20, jnp.float32), jnp.full((3, 3, 16, 32), 1e-20, jnp.float32)
for conv in (onednn.conv_general_dilated, lax.conv_general_dilated):
    y = jax.jit(lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w)
    print(conv.__module__, int(jnp.sum(y != 0)))
"""


def test_denormals_are_flushed_as_xla_does_even_on_threads_pytorch_started():
    """XLA:CPU flushes denormals; the custom call does the same on every OpenMP thread it runs on, also on a team that
    PyTorch (loaded in the same process, as `scoring.init_from` a .pt file does) started without flushing. Products of
    1e-20 x 1e-20 are denormal: XLA gives 0, and so must oneDNN (without the flush 44% of them came out non-zero, and
    the 3-channel input gradient on AVX2 ran 100x slower). One XLA device, so that a call runs 2 OpenMP threads."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _DENORMAL_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(line.rsplit(" ", 1) for line in proc.stdout.strip().splitlines())
    assert counts == {"jax_advprune.kernels.onednn": "0", "jax._src.lax.convolution": "0"}, proc.stdout
