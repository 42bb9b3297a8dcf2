"""oneDNN convolutions for XLA:CPU: a drop-in `conv_general_dilated` for Flax's nn.Conv.

XLA:CPU's own convolutions are slower than the oneDNN kernels PyTorch uses
(benchmarks/conv_layers.py measures both; figures in the README), and an
adversarial training step is mostly convolutions. `conv_general_dilated` sends plain 2-D float32 convolutions
(NHWC/HWIO, no dilation, no groups) on the CPU backend to oneDNN through an
XLA FFI custom call with its own VJP (input and kernel gradients are oneDNN
primitives too); everything else, and every other backend, goes to
`lax.conv_general_dilated`.

The custom call is compiled on first use from `onednn_conv.cc` with the C++
compiler (`CXX`, default g++) against the oneDNN of the `[cpu]` extra
(`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`: headers in <prefix>/include, library
in <prefix>/lib), into ~/.cache/jax_advprune (or $JAX_ADVPRUNE_CACHE). Choice by
the environment variable JAX_ADVPRUNE_CONV or `set_backend`:
  auto    oneDNN when it can be built here, XLA otherwise (the reason is logged)
  onednn  oneDNN or an error saying what is missing
  xla     always lax.conv_general_dilated

Which shapes go where (`route`, logged once per shape, all of them in ROUTES): the
kernel's own checks run at trace time without executing (`plan_call`), for the
forward pass and both gradients; a shape any of them refuses goes to XLA, with the
reason. Negative paddings and empty operands go to XLA. Strided 1x1 convolutions
(the shortcuts of ResNets) are sent as stride-1 ones on the strided slice of their
input: oneDNN 3.2's 1x1 kernel-gradient kernels overrun their scratchpad on strided
inputs with fewer channels than one SIMD block (8 on AVX2, 16 on AVX-512), which
corrupted the heap. At run time the kernel checks every call again and returns an
error instead of computing on anything inconsistent (onednn_conv.cc).

Sharding: inside shard_map (attacks, evaluation, scoring) the call sees
per-device arrays. Under jit with arrays sharded along the batch (the train
step), XLA's partitioner asks the call how to split (`custom_partitioning`):
each device convolves its own rows, and the kernel gradient's per-device sums
are all-reduced over the batch axis. No mesh context is needed; a batch that does
not divide over the devices is gathered and convolved whole on each.
This module imports nothing from the rest of the package but `backends` (which says whether programs are built
for the CPU).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jax_advprune import backends
from jax_advprune.cpu import cpu_info

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "xla")
TARGET = "jax_advprune_onednn_conv"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_backend = [os.environ.get("JAX_ADVPRUNE_CONV", "auto"), "JAX_ADVPRUNE_CONV=xla"]  # (choice, why, for the log)

# Builds of the custom call besides the default one, chosen by JAX_ADVPRUNE_ONEDNN_BUILD (comma-separated), for
# benchmarks/check_onednn_memory.py:
#   checked             AddressSanitizer + UndefinedBehaviorSanitizer, and every buffer oneDNN touches against
#                       PROT_NONE guard pages (oneDNN's generated kernels are invisible to ASan); needs
#                       LD_PRELOAD=$(g++ -print-file-name=libasan.so) in the Python process
#   unsafe-strided-1x1  strided 1x1 convolutions reach oneDNN as they are (the overrun the default build refuses);
#                       the checker's positive control, never for results
BUILD_OPTIONS = {
    "checked": (
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-DADVPRUNE_GUARD_PAGES",
    ),
    "unsafe-strided-1x1": ("-DADVPRUNE_ALLOW_STRIDED_1X1",),
}


class OnednnUnavailableError(RuntimeError):
    """The oneDNN convolution cannot be built or loaded here; the message says why."""


def set_backend(name: str, why: str = "set_backend('xla')") -> None:
    """'auto' | 'onednn' | 'xla' for convolutions traced from now on (jitted functions already compiled keep theirs);
    `why` is what the log says of an 'xla' choice."""
    if name not in BACKENDS:
        raise ValueError(f"convolution backend must be one of {BACKENDS}, got {name!r}")
    _backend[:] = [name, why]


def get_backend() -> str:
    return _backend[0]


def build_options() -> tuple[str, ...]:
    """The non-default builds asked for by JAX_ADVPRUNE_ONEDNN_BUILD (see BUILD_OPTIONS), sorted."""
    asked = tuple(sorted({o.strip() for o in os.environ.get("JAX_ADVPRUNE_ONEDNN_BUILD", "").split(",") if o.strip()}))
    unknown = [o for o in asked if o not in BUILD_OPTIONS]
    if unknown:
        raise OnednnUnavailableError(
            f"JAX_ADVPRUNE_ONEDNN_BUILD: unknown option(s) {unknown}; known: {sorted(BUILD_OPTIONS)}"
        )
    return asked


def onednn_prefix() -> str:
    """The installation prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so ($DNNL_ROOT or this Python's)."""
    candidates = (
        [os.environ["DNNL_ROOT"]]
        if os.environ.get("DNNL_ROOT")
        else [sys.prefix, sysconfig.get_config_var("prefix") or sys.prefix]
    )
    for prefix in candidates:
        lib = os.path.join(prefix, "lib")
        header = os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp")
        if (
            os.path.exists(header)
            and os.path.isdir(lib)
            and any(name.startswith("libdnnl.so") for name in os.listdir(lib))
        ):
            return prefix
    raise OnednnUnavailableError(
        f"oneDNN headers and library not found under {candidates} "
        "(pip install 'jax_advprune[cpu]' installs onednn-cpu-gomp and onednn-devel-cpu-gomp; or set DNNL_ROOT)"
    )


def build_library(options: tuple[str, ...] = ()) -> str:
    """Path of the compiled custom-call library with the given BUILD_OPTIONS, compiling it first if this
    source/jax/oneDNN/compiler/options has no build yet."""
    prefix = onednn_prefix()
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise OnednnUnavailableError(f"C++ compiler {compiler!r} not found (set CXX)")
    flags = [flag for option in options for flag in BUILD_OPTIONS[option]]
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(
            f.read() + jax.__version__.encode() + prefix.encode() + compiler.encode() + " ".join(flags).encode()
        ).hexdigest()[:16]
    cache = os.environ.get("JAX_ADVPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jax_advprune"))
    path = os.path.join(cache, f"libjax_advprune_onednn_{'_'.join(options) + '_' if options else ''}{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [
        compiler,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fopenmp",
        "-w",
        *flags,
        f"-I{jax.ffi.include_dir()}",
        f"-I{os.path.join(prefix, 'include')}",
        SOURCE,
        f"-L{os.path.join(prefix, 'lib')}",
        "-ldnnl",
        f"-Wl,-rpath,{os.path.join(prefix, 'lib')}",
        "-o",
        tmp,
    ]
    log.info("building the oneDNN convolution: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise OnednnUnavailableError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    os.replace(tmp, path)  # atomic: concurrent processes each build, the last one wins, none reads a partial file
    return path


def _asan_preloaded() -> bool:
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


_library: list = []  # the loaded library, once registered


@functools.cache
def _register() -> str | None:
    """Builds, loads and registers the custom call once per process; None when available, else why not."""
    try:
        options = build_options()
        if "checked" in options and not _asan_preloaded():
            raise OnednnUnavailableError(
                "the checked build needs the ASan runtime loaded first: "
                "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ..."
            )
        library = ctypes.cdll.LoadLibrary(build_library(options))
        plan = library.AdvpruneOnednnConvPlan
        plan.restype = ctypes.c_int
        plan.argtypes = (
            [ctypes.c_int64]
            + [ctypes.POINTER(ctypes.c_int64)] * 3
            + [ctypes.c_int64] * 7
            + [ctypes.c_char_p, ctypes.c_int64]
        )
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.AdvpruneOnednnConv), platform="cpu")
        _library.append(library)
    except (OnednnUnavailableError, OSError, AttributeError) as e:
        return str(e)
    return None


def available() -> bool:
    """True when the oneDNN convolution is built and registered in this process."""
    return _register() is None


def _why_not_onednn() -> str | None:
    """None when float32 convolutions go to oneDNN here, else why not; an error when JAX_ADVPRUNE_CONV=onednn can't be met."""
    if get_backend() == "xla":
        return _backend[1]
    if not backends.native_convolutions():
        return f"programs for {backends.target_platform()}"
    why_not = _register()
    if why_not is not None and get_backend() == "onednn":
        raise OnednnUnavailableError(why_not)
    return None if why_not is None else f"oneDNN unavailable: {why_not}"


def describe() -> str:
    """Which convolutions float32 models get here, for the run log: oneDNN, or XLA and why."""
    why_not = _why_not_onednn()
    return f"XLA ({why_not})" if why_not else f"oneDNN custom call, {_threads_per_call()} thread(s) per call"


def host_isa() -> str:
    """'AVX-512', 'AVX2' or 'other': the instruction set oneDNN's kernels use on this host (its CPU's, lowered by
    ONEDNN_MAX_CPU_ISA when that caps it)."""
    flags = cpu_info()[1]
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if not cap or cap == "ALL" or cap.startswith(("AVX512", "AVX10")) or isa == "other":
        return isa
    return "AVX2" if cap.startswith("AVX2") else "other"


def _use_onednn(lhs: jax.Array, rhs: jax.Array, plain: bool) -> bool:
    why_not = _why_not_onednn()
    if why_not is not None:
        _log_once(why_not)
        return False
    return plain and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32


@functools.cache
def _log_once(why_not: str) -> None:
    log.info("convolutions use XLA: %s", why_not)


def _threads_per_call() -> int:
    """OpenMP threads per custom call: the cores shared among this process's CPU devices (each runs its own calls)."""
    return max(1, (os.cpu_count() or 1) // max(1, jax.local_device_count()))


@functools.cache
def plan_call(
    mode: int, a_shape: tuple, b_shape: tuple, out_shape: tuple, strides: tuple, pads: tuple, threads: int
) -> tuple[bool, str]:
    """(True, oneDNN's implementation) when a call of `mode` on these shapes would run, else (False, why not).

    The kernel's own checks (onednn_conv.cc: the buffers form one convolution, tight paddings, no strided 1x1,
    oneDNN has a primitive whose descriptors match the buffers), without executing; the library must be registered.
    """
    (pt, pb), (pl, pr) = pads
    arrays = [(ctypes.c_int64 * 4)(*shape) for shape in (a_shape, b_shape, out_shape)]
    message = ctypes.create_string_buffer(512)
    ok = _library[0].AdvpruneOnednnConvPlan(mode, *arrays, *strides, pt, pb, pl, pr, threads, message, len(message))
    return bool(ok), message.value.decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one convolution goes: `backend` 'oneDNN' or 'XLA', with `detail` (oneDNN's implementations of the
    forward, input-gradient and kernel-gradient calls, or why XLA). `subsampled`: a strided 1x1 convolution sent as
    a stride-1 one on the strided slice of its input."""

    backend: str
    detail: str
    subsampled: bool = False
    strides: tuple = (1, 1)
    pads: tuple = ((0, 0), (0, 0))


ROUTES: dict = {}  # (x shape, kernel shape, strides, pads as asked) -> Route, for every convolution traced here


def tight_padding(
    in_size: Sequence[int], out_size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: tuple
) -> tuple:
    """`pads` with the bottom/right side cut to what the last window reads, max(0, (out - 1) * s + k - in - lo): the
    same output (the rows cut are never read), and the paddings the kernel checks against."""
    return tuple(
        (lo, max(0, (o - 1) * s + k - i - lo)) for i, o, k, s, (lo, _) in zip(in_size, out_size, kernel, strides, pads)
    )


def route(x_shape: tuple, kernel_shape: tuple, strides: tuple, pads: tuple) -> Route:
    """The Route of a float32 NHWC/HWIO convolution on the CPU (logged the first time each shape is seen)."""
    key = (tuple(x_shape), tuple(kernel_shape), tuple(strides), tuple(pads))
    found = ROUTES.get(key)
    if found is None:
        found = ROUTES[key] = _choose_route(*key)
        log.info(
            "convolution x %s * w %s, strides %s, paddings %s -> %s: %s%s",
            key[0],
            key[1],
            key[2],
            key[3],
            found.backend,
            found.detail,
            " (strided 1x1 as a stride-1 convolution of the subsampled input)" if found.subsampled else "",
        )
    return found


def _choose_route(x_shape: tuple, kernel_shape: tuple, strides: tuple, pads: tuple) -> Route:
    if any(p < 0 for pair in pads for p in pair):
        return Route("XLA", "negative padding")
    if any(d < 1 for d in (*x_shape, *kernel_shape)):
        return Route("XLA", "an empty operand")
    y_shape = _output_shape(x_shape, kernel_shape, strides, pads)
    if min(y_shape[1:3]) < 1:
        return Route("XLA", "the kernel is larger than the padded input")
    subsampled = tuple(kernel_shape[:2]) == (1, 1) and strides != (1, 1) and "unsafe-strided-1x1" not in build_options()
    if subsampled:
        x_shape, strides, pads = (x_shape[0], *y_shape[1:3], x_shape[3]), (1, 1), ((0, 0), (0, 0))
    pads = tight_padding(x_shape[1:3], y_shape[1:3], kernel_shape[:2], strides, pads)
    threads = _threads_per_call()
    calls = {
        0: (x_shape, kernel_shape, y_shape),
        1: (y_shape, kernel_shape, x_shape),
        2: (x_shape, y_shape, kernel_shape),
    }
    implementations = []
    for mode, shapes in calls.items():
        ok, message = plan_call(mode, *shapes, strides, pads, threads)
        if not ok:
            return Route(
                "XLA", f"oneDNN refuses the {('forward', 'input gradient', 'kernel gradient')[mode]}: {message}"
            )
        implementations.append(message.split(",")[0])
    return Route("oneDNN", " / ".join(implementations), subsampled, strides, pads)


def _subsample(x: jax.Array, strides: tuple, pads: tuple, out_size: tuple) -> jax.Array:
    """The input pixels a strided 1x1 kernel reads: zero-padded by `pads`, then every stride-th row and column
    (N, HO, WO, C). A 1x1 convolution of it with stride 1 is the strided convolution."""
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    limit = (x.shape[0], (out_size[0] - 1) * strides[0] + 1, (out_size[1] - 1) * strides[1] + 1, x.shape[3])
    return lax.slice(x, (0, 0, 0, 0), limit, (1, *strides, 1))


def _ffi_conv(mode: int, a: jax.Array, b: jax.Array, out_shape: tuple, strides: tuple, pads: tuple) -> jax.Array:
    """One custom call on this device's arrays (mode 0 forward, 1 input gradient, 2 kernel gradient; see the .cc)."""
    (pt, pb), (pl, pr) = pads
    attrs = dict(mode=mode, sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr, threads=_threads_per_call())
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32))(
        a, b, **{k: np.int64(v) for k, v in attrs.items()}
    )


@functools.cache
def _device_op(mode: int, strides: tuple, pads: tuple, shape: tuple):
    """(a, b) -> the custom call of `mode` on one device's arrays, with a vmap rule.

    `shape`: the image shape (H, W, C) for the input gradient, the kernel shape for the
    kernel gradient, () for the forward pass. Under vmap (DeepFool's one VJP per
    candidate class) a mapped image/gradient axis with an unmapped kernel is folded
    into the batch: one call on (V * N, ...) rows; anything else runs one call per index.
    """

    def out_shape(a_shape, b_shape):
        if mode == 0:
            return _output_shape(a_shape, b_shape, strides, pads)
        return (a_shape[0], *shape) if mode == 1 else shape

    partitioned = _partitioned_call(mode, strides, pads, out_shape)

    @jax.custom_batching.custom_vmap
    def op(a, b):
        return partitioned(a, b)

    @op.def_vmap
    def _batched(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if mode in (0, 1) and a_batched and not b_batched:
            folded = op(a.reshape(-1, *a.shape[2:]), b)
            return folded.reshape(axis_size, -1, *folded.shape[1:]), True
        a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_batched else jnp.broadcast_to(b, (axis_size, *b.shape))
        return lax.map(lambda ab: op(*ab), (a, b)), True

    return op


# The dimensions of each call, for XLA's sharding propagation: only the batch `b` may be split.
_SHARDING_RULES = {0: "b h w c, i j c o -> b p q o", 1: "b p q o, i j c o -> b h w c", 2: "b h w c, b p q o -> i j c o"}


def _partitioned_call(mode: int, strides: tuple, pads: tuple, out_shape):
    """The custom call of `mode` with a partitioning rule: split along the batch of its first operand.

    Modes 0 and 1 (forward, input gradient): the result is split like the batch, the
    kernel replicated. Mode 2 (kernel gradient): both operands split along the batch,
    each device's sum all-reduced, the result replicated.
    """

    @custom_partitioning
    def call(a, b):
        return _ffi_conv(mode, a, b, out_shape(a.shape, b.shape), strides, pads)

    def batch_axes(mesh, arg_shapes):
        spec = arg_shapes[0].sharding.spec
        axes = spec[0] if len(spec) else None
        size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ()))]))
        return axes if axes is not None and arg_shapes[0].shape[0] % size == 0 else None

    def infer(mesh, arg_shapes, result_shape):
        axes = batch_axes(mesh, arg_shapes)
        return NamedSharding(mesh, PartitionSpec() if mode == 2 else PartitionSpec(axes))

    def partition(mesh, arg_shapes, result_shape):
        axes = batch_axes(mesh, arg_shapes)
        split, whole = NamedSharding(mesh, PartitionSpec(axes)), NamedSharding(mesh, PartitionSpec())

        def lower(a, b):
            y = _ffi_conv(mode, a, b, out_shape(a.shape, b.shape), strides, pads)
            return lax.psum(y, axes) if mode == 2 and axes is not None else y

        return mesh, lower, whole if mode == 2 else split, (split, split if mode == 2 else whole)

    rule = _SHARDING_RULES[mode]
    factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        reduction_factors=("b",) if mode == 2 else (),
        need_replication_factors=tuple(f for f in factors if f != "b"),
    )
    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """Cross-correlation x (N, H, W, C) float32, kernel (KH, KW, C, O) -> (N, HO, WO, O); pads ((top, bottom), (left, right))."""
    return _device_op(0, strides, pads, ())(x, kernel)


def _onednn_conv_fwd(x, kernel, strides, pads):
    y = onednn_conv(x.value, kernel.value, strides, pads)
    return y, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _onednn_conv_bwd(strides, pads, residuals, dy):
    x, kernel, x_needed, kernel_needed = residuals  # only the gradients asked for are computed
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return None, None
    dx = _device_op(1, strides, pads, tuple(x.shape[1:]))(dy, kernel) if x_needed else None
    dw = _device_op(2, strides, pads, tuple(kernel.shape))(x, dy) if kernel_needed else None
    return dx, dw


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd, symbolic_zeros=True)


def _output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple, pads: tuple) -> tuple:
    spatial = [
        (size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(x_shape[1:3], kernel_shape[:2], strides, pads)
    ]
    return (x_shape[0], *spatial, kernel_shape[3])


def explicit_padding(padding, in_size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> tuple:
    """((top, bottom), (left, right)) for 'SAME' / 'VALID' (as XLA pads: the odd pixel at the end) or explicit pairs."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(tuple(in_size), tuple(kernel), tuple(strides), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc_hwio(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    ones = (1, 1, 1, 1)
    return lax.conv_dimension_numbers(ones, ones, dimension_numbers) == lax.conv_dimension_numbers(
        ones, ones, ("NHWC", "HWIO", "NHWC")
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` with plain 2-D float32 convolutions on the CPU sent to oneDNN (see module doc)."""
    plain = (
        lhs.ndim == 4
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and _is_nhwc_hwio(dimension_numbers)
    )
    if not _use_onednn(lhs, rhs, plain):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    chosen = route(lhs.shape, rhs.shape, strides, pads)
    if chosen.backend == "XLA":
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers, precision=precision
        )
    if chosen.subsampled:
        lhs = _subsample(lhs, strides, pads, _output_shape(lhs.shape, rhs.shape, strides, pads)[1:3])
    return onednn_conv(lhs, rhs, chosen.strides, chosen.pads)
