"""A user's function with its plain convolutions sent to oneDNN: `lax.conv_general_dilated` -> `onednn.conv_general_dilated`.

Models written with the project's layers call oneDNN already (models/layers.py).
A function the user writes with `lax.conv_general_dilated` (or a library that
calls it) runs XLA:CPU's own convolutions, which are slower. `with_onednn_convolutions(fn)`
traces fn to a jaxpr and evaluates it equation by equation, as `jax.core.eval_jaxpr`
does, except that each convolution equation goes through `onednn.conv_general_dilated`
(which keeps XLA's convolution for anything it does not handle: other layouts,
dilation, groups, other backends) and nested `jit` equations are evaluated the same
way. Everything else is bound unchanged, so gradients, vmap and shard_map work as
on the original function. The attacks apply it on the CPU when oneDNN is available
(`attacks.dispatch`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend import core as jex_core

from jax_advprune import backends
from jax_advprune.kernels import onednn

_NESTED_JIT = ("pjit", "jit")


def _evaluate(jaxpr, consts, *args) -> list:
    """jax.core.eval_jaxpr with convolutions through oneDNN and nested jit evaluated inline."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            p = eqn.params
            outs = [
                onednn.conv_general_dilated(
                    values[0],
                    values[1],
                    p["window_strides"],
                    p["padding"],
                    p["lhs_dilation"],
                    p["rhs_dilation"],
                    p["dimension_numbers"],
                    p["feature_group_count"],
                    p["batch_group_count"],
                    p["precision"],
                    p["preferred_element_type"],
                )
            ]
        elif eqn.primitive.name in _NESTED_JIT:
            closed = eqn.params["jaxpr"]
            outs = _evaluate(closed.jaxpr, closed.consts, *values)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _has_convolution(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            return True
        if eqn.primitive.name in _NESTED_JIT and _has_convolution(eqn.params["jaxpr"].jaxpr):
            return True
    return False


def with_onednn_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with every `lax.conv_general_dilated` in it (nested jit included) sent to `onednn.conv_general_dilated`.

    The same wrapper object for an equal fn (the last 64 are kept; a bound method
    equals its re-bound self), so jit caches keyed by the function keep hitting.
    Arguments and outputs are any pytrees.
    """

    def routed(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        if not _has_convolution(closed.jaxpr):
            return fn(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outs)

    routed.__name__ = getattr(fn, "__name__", "routed")
    routed.__wrapped__ = fn
    return routed


with_onednn_convolutions = functools.lru_cache(maxsize=64)(with_onednn_convolutions)


def wanted() -> bool:
    """Route convolutions here: the default backend is the CPU and oneDNN is on (built, and not switched off)."""
    return backends.native_convolutions() and onednn.get_backend() != "xla" and onednn.available()
