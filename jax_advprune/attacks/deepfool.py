"""DeepFool (Moosavi-Dezfooli et al. 2016): a sample's distance to the decision boundary.

The update follows foolbox's form: at every iteration linearise the differences
f_k(x) - f_origin(x) for the candidate classes k, take the class whose linearised
boundary is closest, add the step that reaches it to an accumulated perturbation
r_total, and set x = clip(x0 + (1 + overshoot) * r_total, 0, 1). The origin class
is the model's prediction on x0, and a sample is done once its prediction changes.

Only the (candidate - origin) input gradients are computed: one forward pass and
one VJP per candidate, batched with vmap over cotangents, on a fixed number of
slots that are refilled as samples finish (`queue_step`). `deepfool` drives the
queue from the host on the CPU (XLA:CPU runs that about twice as fast as a loop
body) and inside one `lax.while_loop` elsewhere or within a trace; PUMA's pool
scoring (`pruning.margins`) calls the same function.

Two forms (`form`):
- 'foolbox' (the default): the distance is ||r_total||, the accumulated
  perturbation without the overshoot or the clipping; x_adv is the clipped point.
- 'dm_improves_at': DM-Improves-AT's `core/attacks/deepfool.py` (Wang et al.
  2023, the code base PUMA builds on), through its `DeepFoolAttack` class: the
  same iteration with a step slack of 1e-6 instead of 1e-5, then a bisection of
  `search_steps` (50) halvings on the segment from x0 to the clipped point
  clip(x0 + (1 + overshoot) r_total, 0, 1), keeping the points whose prediction
  is still the origin class; it returns the last midpoint it evaluated, and the
  distance is ||x_adv - x0||, the distance of the returned point. As there, the
  origin class is the prediction at x0 (the class ignores the labels it is given).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_advprune import backends, parallel
from jax_advprune.attacks.common import check_norm, dual_norm_name, flat_norm, per_sample, to_unit_interval
from jax_advprune.attacks.dispatch import AUTO, as_function_tree, is_traced, pad_rows, resolve_mesh, run_attack

LogitsFn = Callable[[jax.Array], jax.Array]

# Added to each linearised distance so that a step never lands exactly on the
# boundary (foolbox adds 1e-4; a smaller value keeps L-inf margins of ~1/255 exact).
STEP_SLACK = 1e-5
REFERENCE_STEP_SLACK = 1e-6  # DM-Improves-AT's `pert + 1e-6`
FORMS = ("foolbox", "dm_improves_at")
BISECTION_ROWS = 256  # rows per forward pass of the bisection (bounds its activation memory)
HOST_DRIVEN_SLOTS_PER_DEVICE = 2
_TINY = 1e-8


class DeepFoolResult(NamedTuple):
    """Per-sample DeepFool outputs; every field has leading shape (B,).

    x_adv: (B, H, W, C) the final point, clip(x0 + (1 + overshoot) r_total, 0, 1);
      in the 'dm_improves_at' form the bisection's last point on the way to it.
    distance: in the attack norm, the estimated distance (>= 0) from x0 to the
      nearest decision boundary: ||r_total||, without the overshoot ('foolbox'),
      or ||x_adv - x0|| ('dm_improves_at').
    margin: +distance where x0 is classified as its label, -distance otherwise.
    converged: True where the prediction at x_adv differs from the one at x0.
    n_iter: number of DeepFool steps the sample took (int32).
    """

    x_adv: jax.Array
    distance: jax.Array
    margin: jax.Array
    converged: jax.Array
    n_iter: jax.Array


class DeepFoolQueue(NamedTuple):
    """State of the DeepFool work queue over a batch x (B, ...) with S slots.

    slot: per-slot arrays (S, ...): the sample held (`sample`), its x0, current x,
      accumulated perturbation r, n_iter, origin class, candidate classes, and
      flags `fresh` (just loaded) and `live` (holds an unfinished sample); `next`
      (1,) is the index of the next waiting sample.
    out: per-sample results (B, ...) written as samples finish.
    """

    slot: dict
    out: dict


def queue_start(x: jax.Array, *, slots: int, num_candidates: int) -> DeepFoolQueue:
    """Loads the first `slots` samples of x (B, H, W, C) into the queue; num_candidates = k (>= 2)."""
    batch = x.shape[0]
    first = x[:slots]
    slot = {
        "sample": jnp.arange(slots),
        "x0": first,
        "x": first,
        "r": jnp.zeros_like(first),
        "n_iter": jnp.zeros((slots,), jnp.int32),
        "origin": jnp.zeros((slots,), jnp.int32),
        "others": jnp.zeros((slots, num_candidates - 1), jnp.int32),
        "fresh": jnp.ones((slots,), bool),
        "live": jnp.ones((slots,), bool),
        "next": jnp.full((1,), slots, jnp.int32),
    }
    out = {
        "x_adv": jnp.zeros_like(x),
        "r_norm": jnp.zeros((batch,), x.dtype),
        "converged": jnp.zeros((batch,), bool),
        "n_iter": jnp.zeros((batch,), jnp.int32),
        "origin": jnp.zeros((batch,), jnp.int32),
    }
    return DeepFoolQueue(slot, out)


def queue_step(
    logits_fn: LogitsFn,
    x: jax.Array,
    queue: DeepFoolQueue,
    *,
    norm: str,
    max_iter: int,
    overshoot: float,
    slack: float = STEP_SLACK,
) -> DeepFoolQueue:
    """One DeepFool iteration on every slot, then finished samples are written out and replaced.

    One forward pass and one VJP per candidate class on the S slots; x (B, ...) is the batch
    the queue draws from; `slack` is added to each step's linearised distance.
    """
    slot, out = queue.slot, queue.out
    batch = x.shape[0]
    rows = jnp.arange(slot["sample"].shape[0])
    k = slot["others"].shape[1] + 1
    logits, vjp_fn = jax.vjp(logits_fn, slot["x"])
    num_classes = logits.shape[-1]
    _, ranked = jax.lax.top_k(logits, k)
    origin = jnp.where(slot["fresh"], ranked[:, 0], slot["origin"])
    others = jnp.where(slot["fresh"][:, None], ranked[:, 1:], slot["others"])
    flipped = jnp.argmax(logits, axis=-1) != origin
    finished = slot["live"] & (flipped | (slot["n_iter"] >= max_iter))

    # Write finished samples out (rows of other slots go out of range and are dropped).
    target = jnp.where(finished, slot["sample"], batch)
    out = {
        "x_adv": out["x_adv"].at[target].set(slot["x"], mode="drop"),
        "r_norm": out["r_norm"].at[target].set(flat_norm(slot["r"], norm), mode="drop"),
        "converged": out["converged"].at[target].set(flipped, mode="drop"),
        "n_iter": out["n_iter"].at[target].set(slot["n_iter"], mode="drop"),
        "origin": out["origin"].at[target].set(origin, mode="drop"),
    }

    # One DeepFool step for the samples that go on: linearise f_k - f_origin.
    cotangents = jax.nn.one_hot(others, num_classes) - jax.nn.one_hot(origin, num_classes)[:, None, :]
    grads = jax.vmap(lambda c: vjp_fn(c)[0])(jnp.moveaxis(cotangents, 1, 0))  # (k-1, S, H, W, C)
    gaps = jnp.take_along_axis(logits, others, axis=-1) - logits[rows, origin][:, None]  # (S, k-1)
    grad_norms = jax.vmap(lambda g: flat_norm(g, dual_norm_name(norm)))(grads).T  # (S, k-1)
    distances = jnp.abs(gaps) / (grad_norms + _TINY)
    best = jnp.argmin(distances, axis=1)
    best_grad = grads[best, rows]
    if norm == "l2":
        direction = best_grad / per_sample(grad_norms[rows, best] + _TINY, best_grad)
    else:
        direction = jnp.sign(best_grad)
    r_step = per_sample(distances[rows, best] + slack, direction) * direction
    going_on = slot["live"] & ~finished
    r = jnp.where(per_sample(going_on, r_step), slot["r"] + r_step, slot["r"])
    x_next = jnp.clip(slot["x0"] + (1.0 + overshoot) * r, 0.0, 1.0)
    x_cur = jnp.where(per_sample(going_on, x_next), x_next, slot["x"])

    # Finished slots take the next waiting samples.
    new_sample = slot["next"][0] + jnp.cumsum(finished) - 1
    refill = finished & (new_sample < batch)
    new_x0 = x[jnp.clip(new_sample, 0, batch - 1)]
    refill_b = per_sample(refill, new_x0)
    slot = {
        "sample": jnp.where(refill, new_sample, slot["sample"]),
        "x0": jnp.where(refill_b, new_x0, slot["x0"]),
        "x": jnp.where(refill_b, new_x0, x_cur),
        "r": jnp.where(refill_b, 0.0, r),
        "n_iter": jnp.where(refill, 0, slot["n_iter"] + going_on.astype(jnp.int32)),
        "origin": origin,
        "others": others,
        "fresh": refill,
        "live": going_on | refill,
        "next": slot["next"] + jnp.sum(finished, dtype=jnp.int32),
    }
    return DeepFoolQueue(slot, out)


def _result(out: dict, x_adv: jax.Array, distance: jax.Array, y: jax.Array) -> DeepFoolResult:
    """DeepFoolResult from a drained queue's `out`, the returned points and their distances; y (B,) sets the sign."""
    return DeepFoolResult(
        x_adv, distance, jnp.where(out["origin"] == y, distance, -distance), out["converged"], out["n_iter"]
    )


def queue_result(queue: DeepFoolQueue, y: jax.Array) -> DeepFoolResult:
    """DeepFoolResult of a drained queue ('foolbox' form); y (B,) int labels set the margins' sign."""
    return _result(queue.out, queue.out["x_adv"], queue.out["r_norm"], y)


def bisect_to_boundary(
    logits_fn: LogitsFn, x0: jax.Array, origin: jax.Array, x_end: jax.Array, steps: int
) -> jax.Array:
    """DM-Improves-AT's refinement: `steps` (>= 1) halvings of t in [0, 1] on x0 + t (x_end - x0), keeping the low end
    where the prediction is still `origin` (B,) and the high end where it is not -> the last midpoint evaluated
    (B, H, W, C). x0 and x_end (B, H, W, C) in [0, 1]. One forward pass of the batch per halving."""
    dx = x_end - x0
    ends = jnp.zeros(x0.shape[:1], x0.dtype), jnp.ones(x0.shape[:1], x0.dtype)

    def halve(_, carry):
        low, high, _ = carry
        mid = (low + high) / 2
        point = x0 + per_sample(mid, dx) * dx
        stays = jnp.argmax(logits_fn(point), axis=-1) == origin
        return jnp.where(stays, mid, low), jnp.where(stays, high, mid), point

    return jax.lax.fori_loop(0, steps, halve, (*ends, x0))[2]


def reference_result(
    logits_fn: LogitsFn, x0: jax.Array, y: jax.Array, queue: DeepFoolQueue, *, norm: str, search_steps: int
) -> DeepFoolResult:
    """DeepFoolResult of a drained queue in the 'dm_improves_at' form: the bisection from x0 (B, H, W, C) in [0, 1]
    towards each sample's clipped DeepFool point, in slices of BISECTION_ROWS rows, and the distance of the point
    it returns. `converged` and `n_iter` are the DeepFool iteration's; y (B,) sets the margins' sign."""
    out = queue.out
    if search_steps <= 0:  # no bisection: the clipped point itself
        return _result(out, out["x_adv"], flat_norm(out["x_adv"] - x0, norm), y)
    batch = x0.shape[0]
    rows = min(BISECTION_ROWS, batch)
    extra = -batch % rows

    def sliced(a):  # (B, ...) -> (slices, rows, ...), padded with copies of row 0
        a = jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]) if extra else a
        return a.reshape((-1, rows) + a.shape[1:])

    points = jax.lax.map(
        lambda a: bisect_to_boundary(logits_fn, *a, search_steps),
        (sliced(x0), sliced(out["origin"]), sliced(out["x_adv"])),
    )
    x_adv = points.reshape((-1,) + x0.shape[1:])[:batch]
    return _result(out, x_adv, flat_norm(x_adv - x0, norm), y)


def finish_queue(
    logits_fn: LogitsFn, x0: jax.Array, y: jax.Array, queue: DeepFoolQueue, *, norm: str, form: str, search_steps: int
) -> DeepFoolResult:
    """The DeepFoolResult of a drained queue in `form` (see the module docstring); x0 (B, H, W, C) in [0, 1]."""
    if form == "foolbox":
        return queue_result(queue, y)
    return reference_result(logits_fn, x0, y, queue, norm=norm, search_steps=search_steps)


def check_form(form: str, search_steps: int) -> None:
    """Raises ValueError unless `form` is one of FORMS and search_steps >= 0."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if int(search_steps) != search_steps or search_steps < 0:
        raise ValueError(f"search_steps must be an integer >= 0, got {search_steps!r}")


def step_slack(form: str) -> float:
    """The slack added to each linearised distance in `form`: 1e-5 ('foolbox'), 1e-6 ('dm_improves_at')."""
    return STEP_SLACK if form == "foolbox" else REFERENCE_STEP_SLACK


def num_candidates(logits_fn: LogitsFn, x: jax.Array, slots: int, candidates: int | None) -> int:
    """k: the number of classes DeepFool considers (the predicted one included)."""
    num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((slots,) + x.shape[1:], jnp.float32)).shape[-1]
    return num_classes if candidates is None else max(2, min(int(candidates), num_classes))


def deepfool(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    norm: str = "l2",
    max_iter: int = 50,
    overshoot: float = 0.02,
    candidates: int | None = None,
    slots: int | None = None,
    mesh=AUTO,
    host_driven: bool | None = None,
    steps_per_check: int = 2,
    form: str = "foolbox",
    search_steps: int = 50,
) -> DeepFoolResult:
    """Minimal perturbation that changes the model's prediction, per sample.

    Samples are processed through a fixed number of `slots` (a work queue): a
    sample leaves its slot as soon as it is done and the next waiting sample
    takes it, so the cost follows the total number of iterations rather than
    (number of batches) x (slowest sample's iterations). Each sample's result is
    the same as running it alone.

    Args:
      logits_fn: images (S, H, W, C) in [0, 1] -> logits (S, K), called on `slots`
        samples at a time. Samples must be independent (BatchNorm in inference
        mode), since per-sample gradients are read from one batched VJP.
      x: images (B, H, W, C), float32 in [0, 1] or uint8 in [0, 255].
      y: int labels (B,); they set the sign of the margin only.
      norm: 'l2' or 'linf'; the distance is measured in this norm.
      max_iter: iteration cap. Samples not flipped by then keep their accumulated
        distance and `converged=False`.
      overshoot: r_total is scaled by (1 + overshoot) when forming x_adv.
      candidates: number of top classes by logit at x0 considered (the predicted
        one included); None = all classes.
      slots: samples processed per iteration, over all devices. None: host-driven,
        HOST_DRIVEN_SLOTS_PER_DEVICE per device (on 2 CPU cores this ran 1.5-2.4x
        faster than all samples at once, on CNNs and PreAct ResNet-18 alike: the
        (K - 1)-cotangent VJP of a few samples stays in cache); in a loop, all B at once.
      mesh: 'auto' (every local device when there are several), a Mesh with a
        'data' axis, or None; each device runs its own queue over its share.
      host_driven: drive the queue from Python, one jitted step call per
        `steps_per_check` iterations, or inside one `lax.while_loop`. None:
        `backends.host_driven_deepfool()`, the host on the CPU (it runs
        straight-line code about twice as fast as a loop body), the while loop on
        accelerators. Inside a trace it is always the while loop.
      form: 'foolbox' (distance ||r_total||) or 'dm_improves_at' (DM-Improves-AT's
        DeepFoolAttack: step slack 1e-6, then a bisection towards the clipped point,
        distance of the returned point); see the module docstring.
      search_steps: the bisection's halvings in the 'dm_improves_at' form (its
        default, 50); one forward pass of every sample each. Unused by 'foolbox'.

    What each form costs (2-core Xeon, AVX-512; benchmarks/attacks.py against
    foolbox's DeepFool on the same model in the same run):
      - called directly (outside any jit), on the CPU: the host-driven queue,
        2.1-3.5x foolbox's speed on the project's three models; the first call
        also compiles (a plain lax.conv CNN of 64 images: 0.27-0.37x foolbox
        for that first call, compilation included).
      - inside your own `jax.jit`: the while loop. On a TPU or GPU that is the
        fast form. On the CPU it takes a CPU shape (the user's convolutions sent
        to oneDNN, 2 slots, 2 queue steps per loop iteration): a plain `lax.conv`
        CNN, 64 images, weights closed over, ran at 1.51x (L2) and 1.61x (L-inf)
        foolbox, where the direct call ran at 2.51x and 2.47x in the same run
        (benchmarks/results/attacks_deepfool_in_jit.json; before the CPU shape
        this form ran at 0.2-0.3x). For the fastest CPU path, call `deepfool`
        outside your jit: it compiles once per function object, settings and
        shapes and is reused.

    Compiled once per `logits_fn` object, settings and shapes, as `pgd` is.

    Returns:
      DeepFoolResult, see its docstring.
    """
    check_norm(norm)
    check_form(form, search_steps)
    settings = dict(
        norm=norm, max_iter=max_iter, overshoot=overshoot, candidates=candidates, form=form, search_steps=search_steps
    )
    if is_traced((logits_fn, x, y)):  # inside the caller's jit: the while loop, in its fastest form for the platform
        if backends.target_platform() == "cpu":
            logits_fn = as_function_tree(
                logits_fn
            )  # the caller's lax.conv convolutions through oneDNN, as outside a trace
            slots = HOST_DRIVEN_SLOTS_PER_DEVICE if slots is None else slots  # few samples per step stay in cache
        return _deepfool_loop(
            logits_fn, x, y, None, slots=slots, steps_per_iteration=in_trace_steps(steps_per_check), **settings
        )
    logits_fn = as_function_tree(logits_fn)
    if host_driven is None:
        host_driven = backends.host_driven_deepfool()
    mesh = resolve_mesh(mesh)
    if not host_driven:
        per_device = None if slots is None else -(-int(slots) // (mesh.size if mesh else 1))
        return run_attack(
            _deepfool_loop, logits_fn, x, y, None, dynamic={}, static=dict(settings, slots=per_device), mesh=mesh
        )
    mesh = mesh or Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
    batch = x.shape[0]
    (x, y), extra = pad_rows((x, y), mesh.size)
    per_device_batch = x.shape[0] // mesh.size
    wanted = HOST_DRIVEN_SLOTS_PER_DEVICE if slots is None else -(-int(slots) // mesh.size)
    per_device_slots = max(1, min(wanted, per_device_batch))
    start, advance, finish = queue_programs(mesh, per_device_slots, steps_per_check, **settings)
    replicated = parallel.replicated(mesh)
    logits_fn = jax.device_put(logits_fn, replicated)  # once: the host loop must not re-send the weights every step
    x, y = parallel.shared_batch((x, y), mesh)
    queue = start(logits_fn, x)
    while np.any(parallel.to_host(queue.slot["live"])):
        queue = advance(logits_fn, x, queue)
    result = finish(logits_fn, x, queue, y)
    return jax.tree_util.tree_map(lambda a: a[:batch], result) if extra else result


def in_trace_steps(steps_per_check: int) -> int:
    """Queue steps per while-loop iteration inside a trace: `steps_per_check` on the CPU (XLA:CPU runs straight-line
    code faster than loop iterations; a step on a drained queue changes nothing), 1 on accelerators."""
    return max(1, int(steps_per_check)) if backends.target_platform() == "cpu" else 1


def _deepfool_loop(
    logits_fn,
    x,
    y,
    key,
    *,
    norm,
    max_iter,
    overshoot,
    candidates,
    slots,
    steps_per_iteration: int = 1,
    form: str = "foolbox",
    search_steps: int = 50,
) -> DeepFoolResult:
    """DeepFool with the queue inside one `lax.while_loop`, `steps_per_iteration` queue steps per iteration
    (traceable; `key` is unused)."""
    del key
    x = to_unit_interval(jnp.asarray(x))
    slots = x.shape[0] if slots is None else max(1, min(int(slots), x.shape[0]))
    queue = queue_start(x, slots=slots, num_candidates=num_candidates(logits_fn, x, slots, candidates))
    slack = step_slack(form)

    def steps(q):
        for _ in range(steps_per_iteration):
            q = queue_step(logits_fn, x, q, norm=norm, max_iter=max_iter, overshoot=overshoot, slack=slack)
        return q

    queue = jax.lax.while_loop(lambda q: jnp.any(q.slot["live"]), steps, queue)
    return finish_queue(logits_fn, x, y, queue, norm=norm, form=form, search_steps=search_steps)


@functools.cache
def queue_programs(
    mesh: Mesh,
    slots: int,
    steps_per_check: int,
    *,
    norm: str,
    max_iter: int,
    overshoot: float,
    candidates: int | None,
    form: str = "foolbox",
    search_steps: int = 50,
):
    """(start, advance, finish): the host-driven queue's jitted programs, sharded over `mesh`, `slots` per device.

    start(logits_fn, x) -> queue; advance(logits_fn, x, queue) -> queue (`steps_per_check` steps);
    finish(logits_fn, x, queue, y) -> DeepFoolResult in `form`."""
    slack = step_slack(form)

    def start_shard(logits_fn, x):
        x = to_unit_interval(x)
        return queue_start(x, slots=slots, num_candidates=num_candidates(logits_fn, x, slots, candidates))

    def advance_shard(logits_fn, x, queue):
        x = to_unit_interval(x)
        for _ in range(steps_per_check):
            queue = queue_step(logits_fn, x, queue, norm=norm, max_iter=max_iter, overshoot=overshoot, slack=slack)
        return queue

    def finish_shard(logits_fn, x, queue, y):
        return finish_queue(logits_fn, to_unit_interval(x), y, queue, norm=norm, form=form, search_steps=search_steps)

    start = jax.jit(parallel.shard_over_batch(start_shard, mesh, 1))
    advance = jax.jit(parallel.shard_over_batch(advance_shard, mesh, 1), donate_argnums=2)
    finish = jax.jit(parallel.shard_over_batch(finish_shard, mesh, 1))
    return start, advance, finish
