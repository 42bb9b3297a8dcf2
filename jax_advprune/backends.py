"""The one place that picks the backend-specific form of a program.

XLA:CPU and the accelerators want different programs for the same computation:

| choice | CPU | TPU, GPU | why |
| --- | --- | --- | --- |
| attack loops (PGD) | unrolled | `fori_loop` body | XLA:CPU runs straight-line code 2.6-3.4x faster; on an accelerator a loop body runs as fast and compiles in a fraction of the time (unrolled, a WRN-28-10 TRADES step did not compile for a TPU in 10 minutes) |
| DeepFool's work queue | driven from the host | one `while_loop` | same reason; a host loop on an accelerator pays a dispatch per step |
| convolutions | oneDNN custom call (`kernels.onednn`) | XLA's | the custom call exists for the CPU only |
| compute dtype 'auto' | float32 | bfloat16 | this CPU has no bf16 arithmetic; TPUs and GPUs run bf16 at their peak |

Every choice reads `target_platform()`: the default backend, or the platform that
`building_for` names while programs are traced for another machine (the `plan`
command compiles TPU programs on a CPU host). Nothing here imports the rest of
the package.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_target = threading.local()


def target_platform() -> str:
    """'cpu', 'gpu' or 'tpu': what the programs traced now will run on."""
    platform = getattr(_target, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def building_for(platform: str) -> Iterator[None]:
    """Programs traced inside take the form of `platform` ('cpu' | 'gpu' | 'tpu'), whatever this host runs."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    previous = getattr(_target, "platform", None)
    _target.platform = platform
    try:
        yield
    finally:
        _target.platform = previous


@contextlib.contextmanager
def forcing_unroll(active: bool = True) -> Iterator[None]:
    """While active, `unroll_loops()` unrolls whatever the platform: the cost probes of `plan` (XLA's cost analysis
    counts a loop body once; unrolled, every iteration counts)."""
    previous = getattr(_target, "unroll", False)
    _target.unroll = active or previous
    try:
        yield
    finally:
        _target.unroll = previous


def unroll_loops() -> bool | int:
    """`unroll` for the attacks' fixed-length loops (PGD): fully unrolled on the CPU, a loop body elsewhere."""
    return True if target_platform() == "cpu" or getattr(_target, "unroll", False) else 1


def host_driven_deepfool() -> bool:
    """Drive DeepFool's work queue from the host (CPU) or inside one while_loop (accelerators)."""
    return target_platform() == "cpu"


def native_convolutions() -> bool:
    """Whether the oneDNN custom call may be used: on the CPU only."""
    return target_platform() == "cpu"


def compute_dtype(name: str):
    """The dtype of train.compute_dtype `name`: 'float32', 'bfloat16', or 'auto' (bfloat16 on TPU and GPU, float32
    on the CPU)."""
    if name == "auto":
        return jnp.float32 if target_platform() == "cpu" else jnp.bfloat16
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES) + ['auto']}, got {name!r}")
    return COMPUTE_DTYPES[name]
