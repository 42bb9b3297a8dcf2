"""One `data` mesh axis over all devices: shardings, process-local -> global arrays, shard_map.

On the CPU the batch is split across virtual devices too (`use_cpu_devices`),
since one XLA:CPU device does not keep all cores busy. `map_rows` is the one
loop over many rows (a pool, a test split, kNN queries): fixed-shape padded
chunks, sharded over the mesh, results brought back to the host.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_advprune.resume_log import ResumeLog

DATA_AXIS = "data"


def use_cpu_devices(count: int | None = None) -> int:
    """Asks XLA:CPU for `count` virtual devices (default: two per core, measured fastest for
    PGD on 2 cores; the README's Performance section); call before jax starts.

    Leaves an explicit `--xla_force_host_platform_device_count` in XLA_FLAGS alone.
    Returns the count asked for (0 when XLA_FLAGS already decides).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = count or 2 * (os.cpu_count() or 1)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def make_mesh(num_devices: int | None = None, local: bool = False) -> Mesh:
    """A 1-D mesh named DATA_AXIS over `num_devices` devices (default: all): the first
    num_devices / process_count devices of every process, in process order, so that each
    process holds an equal, contiguous share of every batch. With `local`, over this
    process's devices only (a user's call of an attack outside a run)."""
    if local:
        return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))
    devices = jax.devices()
    if num_devices:
        processes = jax.process_count()
        if num_devices > len(devices) or num_devices % processes:
            raise ValueError(
                f"asked for {num_devices} devices: needs at most the {len(devices)} that exist and a multiple of the {processes} processes"
            )
        per_process = num_devices // processes
        by_process: dict[int, list] = {}
        for device in devices:
            by_process.setdefault(device.process_index, []).append(device)
        devices = [d for index in sorted(by_process) for d in by_process[index][:per_process]]
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
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a  # already placed
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


def remainder_size(count: int, chunk_size: int) -> int:
    """Rows a last chunk of `count` <= chunk_size rows is padded to with `padded_chunks(..., shrink_last=True)`:
    chunk_size when full, else the next multiple of max(8, chunk_size // 8), so that a program compiles for at most
    8 shapes while a few rows cost little."""
    step = max(8, chunk_size // 8)
    return min(chunk_size, -(-count // step) * step)


def padded_chunks(n: int, chunk_size: int, shrink_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (rows (size,), valid (size,) bool) covering range(n) in order, size = chunk_size.

    The last chunk is padded with row 0 and valid=False: to chunk_size, so every chunk has one shape (one
    compiled program serves any n), or with `shrink_last` only to `remainder_size` (AutoAttack's later passes
    run on few survivors).
    """
    for start in range(0, n, chunk_size):
        size = remainder_size(min(chunk_size, n - start), chunk_size) if shrink_last else chunk_size
        rows = np.arange(start, start + size)
        valid = rows < n
        yield np.where(valid, rows, 0), valid


def map_rows(
    compute: Callable[..., dict],
    read: Callable[[np.ndarray], tuple],
    n: int,
    chunk_size: int,
    mesh: Mesh,
    *,
    out: dict[str, np.ndarray] | None = None,
    resume_dir: str | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
) -> dict[str, np.ndarray]:
    """Maps `compute` over rows [0, n) in fixed-shape chunks split over the mesh -> {name: (n, ...) host array}.

    read(rows (chunk_size,) int) -> tuple of host arrays (leading axis chunk_size), the
    same on every process; padding rows repeat row 0 and are discarded.
    compute(chunk_index, *arrays placed over DATA_AXIS) -> {name: array (chunk_size, ...)}.
    `out` may hold preallocated (e.g. memory-mapped) arrays to fill; others are allocated.
    With `resume_dir` every finished chunk is saved there (chunk_<i>.npz, process 0,
    atomically) and a chunk found there is loaded instead of computed, so a killed run
    resumes where it stopped; on a SIGTERM it then stops after the chunk it is saving
    (`preemption.Preempted`). on_chunk(chunk_index, {name: valid rows}) follows every chunk.
    chunk_size must divide over the mesh's devices.
    """
    check_divisible(chunk_size, mesh, "chunk size")
    out = dict(out or {})
    log = ResumeLog(resume_dir, "chunk_", 6) if resume_dir else None  # opened once: every process skips the same chunks
    for index, (rows, valid) in enumerate(padded_chunks(n, chunk_size)):
        if log is not None and log.has(index):
            done = log.load(index)
        else:
            result = compute(index, *shared_batch(read(rows), mesh))
            done = {
                name: np.asarray(to_host(value) if isinstance(value, jax.Array) else value)[valid]
                for name, value in result.items()
            }
            if log is not None:
                log.save(index, **done)
        for name, value in done.items():
            if name not in out:
                out[name] = np.zeros((n,) + value.shape[1:], value.dtype)
            out[name][rows[valid]] = value
        if on_chunk is not None:
            on_chunk(index, done)
        if log is not None:
            log.stop_if_preempted(f"{index + 1} chunks of {chunk_size} rows")
    return out


def agree_or_raise(error: Exception | None, elsewhere: Exception) -> None:
    """After a step only process 0 does (taking the run lock): raises `error` there, and `elsewhere` on every
    other process when process 0 failed, so no process goes on alone (and none waits forever at a barrier)."""
    failed = error is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if error is not None:
        raise error
    if failed:
        raise elsewhere
