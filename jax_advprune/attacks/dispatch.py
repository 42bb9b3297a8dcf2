"""Calling an attack the way a user does: compiled once per function and shapes, spread over the local devices.

An attack is written as a pure, traceable function `impl(logits_fn, x, y, key,
**settings)`. `run_attack` is how the public functions call it:
- inside a trace (the caller's own `jit`, `shard_map`, `grad`): `impl` itself, inlined;
- otherwise through a `jax.jit` kept in a module-level cache, keyed by the
  attack, its static settings and the mesh. `logits_fn` travels as a
  `jax.tree_util.Partial`, so the cache key holds the function object and the
  compiled program is reused for every later call with the same function and
  shapes. A `Partial(apply, params)` passes the weights as arguments (new weights
  reuse the program); a plain closure's captured weights become constants of it.
- outside a trace, on the CPU with oneDNN available, the convolutions of a
  user's plain `lax.conv_general_dilated` model are sent to oneDNN
  (`kernels.onednn_route`), as the project's own layers are;
- with a mesh (by default every local device when there are several, such as
  the virtual XLA:CPU devices of `parallel.use_cpu_devices`), the batch is split
  over the devices with `shard_map`, padded to a multiple of their count; each
  device folds its index into the key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.tree_util import Partial

from jax_advprune import parallel
from jax_advprune.kernels import onednn_route

AUTO = "auto"  # mesh argument: every local device when there are several, else none
_COMPILED: dict = {}


def as_function_tree(logits_fn: Callable) -> Partial:
    """`logits_fn` as a pytree whose structure is the function and whose leaves are its bound arguments;
    on the CPU with oneDNN, the function's `lax.conv_general_dilated` calls go to oneDNN (kernels.onednn_route)."""
    tree = logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)
    if onednn_route.wanted():
        tree = Partial(onednn_route.with_onednn_convolutions(tree.func), *tree.args, **tree.keywords)
    return tree


def is_traced(tree: Any) -> bool:
    """True when any leaf of `tree` is a tracer (we are inside someone's jit / grad / shard_map)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


@functools.cache
def local_mesh() -> Mesh | None:
    """A DATA_AXIS mesh over this process's devices when it has several, else None."""
    return parallel.make_mesh(local=True) if len(jax.local_devices()) > 1 else None


def resolve_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """`mesh` as given, or `local_mesh()` for AUTO."""
    return local_mesh() if isinstance(mesh, str) and mesh == AUTO else mesh


def pad_rows(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pads every array of `tree` along axis 0 to a multiple of `multiple` with copies of row 0 -> (tree, rows added)."""
    batch = jax.tree_util.tree_leaves(tree)[0].shape[0]
    extra = -batch % multiple
    if not extra:
        return tree, 0
    return jax.tree_util.tree_map(
        lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], extra, 0)]), tree
    ), extra


def attack_program(
    impl: Callable, mesh: Mesh | None, shared_names: tuple, batched_names: tuple, static_items: tuple
) -> Callable:
    """The jitted program of `impl` that `run_attack` calls (cached): (logits_fn tree, key, *shared values, x, y,
    *batched values) -> impl's outputs, split over `mesh`'s DATA_AXIS when there is one (the first 2 + len(shared)
    arguments replicated, the rest split along axis 0). `static_items`: sorted (name, value) pairs."""
    cache_key = (impl, mesh, shared_names, batched_names, static_items)
    compiled = _COMPILED.get(cache_key)
    if compiled is None:
        static = dict(static_items)

        def flat(logits_fn, key, *values):
            shared = dict(zip(shared_names, values[: len(shared_names)]))
            x, y, *rest = values[len(shared_names) :]
            if mesh is not None and key is not None:
                key = parallel.shard_key(key)
            return impl(logits_fn, x, y, key, **shared, **dict(zip(batched_names, rest)), **static)

        if mesh is not None:
            flat = parallel.shard_over_batch(flat, mesh, num_replicated=2 + len(shared_names))
        compiled = _COMPILED[cache_key] = jax.jit(flat)
    return compiled


def split_dynamic(dynamic: dict) -> tuple[tuple, tuple]:
    """(shared names, batched names) of an attack's dynamic arguments: batched ones have a leading sample axis
    (per-sample eps, targets) and are split like x; scalars (and None) are shared."""
    batched = tuple(name for name, value in dynamic.items() if value is not None and jnp.ndim(value) >= 1)
    return tuple(name for name in dynamic if name not in batched), batched


def run_attack(
    impl: Callable, logits_fn: Callable, x, y, key, *, dynamic: dict, static: dict, mesh: Mesh | str | None = AUTO
):
    """impl(logits_fn, x, y, key, **dynamic, **static), compiled once and cached (see the module docstring).

    x (B, ...) and y (B, ...) are split over the mesh; so is every `dynamic` value
    with a leading axis (per-sample eps, targets), the scalars are replicated.
    `static` values (step counts, norm, loss names) must be hashable; each new
    value compiles anew. Returns impl's outputs, every one with leading axis B.
    """
    if is_traced((logits_fn, x, y, key, dynamic)):  # inlined in the caller's program: no cache, no routing
        return impl(logits_fn, x, y, key, **dynamic, **static)
    logits_fn = as_function_tree(logits_fn)
    mesh = resolve_mesh(mesh)
    shared_names, batched_names = split_dynamic(dynamic)
    shared = [dynamic[name] for name in shared_names]
    batched = (x, y, *(dynamic[name] for name in batched_names))
    compiled = attack_program(impl, mesh, shared_names, batched_names, tuple(sorted(static.items())))
    if mesh is None:
        return compiled(logits_fn, key, *shared, *batched)
    batch = x.shape[0]
    batched, extra = pad_rows(batched, mesh.size)
    replicated = parallel.replicated(mesh)
    # Scalars as arrays first: on several processes, device_put checks that a value is the same everywhere,
    # and its check mistakes a Python float for a different value.
    shared = [None if value is None else jnp.asarray(value) for value in shared]
    out = compiled(
        jax.device_put(logits_fn, replicated),
        jax.device_put(key, replicated),
        *jax.device_put(shared, replicated),
        *parallel.shared_batch(batched, mesh),
    )
    return jax.tree_util.tree_map(lambda a: a[:batch], out) if extra else out
