"""One `data` mesh axis over all devices: shardings, process-local -> global arrays, shard_map.

On the CPU the batch is split across virtual devices too (`use_cpu_devices`),
since one XLA:CPU device does not keep all cores busy (see ../shared/STACK.md).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def use_cpu_devices(count: int | None = None) -> int:
    """Asks XLA:CPU for `count` virtual devices (default: two per core); call before jax starts.

    Two per core measured fastest for PGD-10 on 2 cores (1,895 img/s on 4 devices,
    1,530 on 2, 1,092 on 1; small CNN, batch 128).

    Leaves an explicit `--xla_force_host_platform_device_count` in XLA_FLAGS alone.
    Returns the count asked for (0 when XLA_FLAGS already decides).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = count or 2 * (os.cpu_count() or 1)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named DATA_AXIS over the first `num_devices` devices (default: all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, but only {len(devices)} exist: {devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over DATA_AXIS."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    """Raises unless `size` splits evenly over the mesh's devices."""
    if size % mesh.size:
        raise ValueError(f"{what} ({size}) must be divisible by the number of devices ({mesh.size})")


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Process-local arrays (leading axis = this process's share) -> global arrays sharded over DATA_AXIS.

    On one process this is a device_put; on many, each process contributes its rows.
    """
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local)


def shared_batch(tree: Any, mesh: Mesh) -> Any:
    """Host arrays that every process holds whole (leading axis = global batch) -> global arrays
    sharded over DATA_AXIS; each process places only the rows of its own devices."""
    sharding = batch_sharding(mesh)

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree_util.tree_map(place, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array -> the whole numpy array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(mode: str = "auto") -> bool:
    """Starts multi-host JAX (`jax.distributed.initialize`) from the environment; True when it did.

    mode 'auto': only when JAX_COORDINATOR_ADDRESS or JAX_NUM_PROCESSES is set,
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID read from the environment (or left
    to JAX's cluster detection: SLURM, Open MPI, Cloud TPU, Kubernetes). 'on':
    always (JAX detects the cluster). 'off': never. The same command then runs
    on one host or many. CPU processes exchange data through gloo.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    env = os.environ
    if mode == "off" or (mode == "auto" and not (env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES"))):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    num_processes, process_id = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=int(num_processes) if num_processes else None,
        process_id=int(process_id) if process_id else None,
    )
    return True


def sync(name: str) -> None:
    """Barrier across the processes of a multi-host run (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shard_over_batch(fn: Callable, mesh: Mesh, num_replicated: int) -> Callable:
    """shard_map of fn(*replicated_args, *batched_args) -> outputs with a leading batch axis.

    The first `num_replicated` arguments (parameters, keys) are passed whole to every
    device; the rest are split along axis 0. Inside fn, `jax.lax.axis_index(DATA_AXIS)`
    names the shard (fold it into random keys). Per-sample work only: fn must not
    mix samples across shards.
    """

    def wrapped(*args):
        specs = (PartitionSpec(),) * num_replicated + (PartitionSpec(DATA_AXIS),) * (len(args) - num_replicated)
        # check_vma=False: loop carries built from constants inside fn (the DeepFool work
        # queue) are per-shard values, which the varying-axis checker cannot see.
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(DATA_AXIS), check_vma=False)(*args)

    return wrapped


def shard_key(key: jax.Array) -> jax.Array:
    """Inside shard_over_batch: a key distinct for each shard."""
    return jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
