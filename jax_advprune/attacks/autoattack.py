"""AutoAttack (Croce & Hein 2020): an ensemble of attacks, each run on the samples still robust.

Versions, in the reference package's order:
- 'standard': APGD-CE, APGD-T (targeted DLR), FAB-T, Square (what papers and
  RobustBench report), with the reference settings: 100 iterations for APGD and
  FAB, 9 target classes (capped at K - 1), 5,000 Square queries, one restart each.
- 'lite': APGD-CE then APGD-T only (a cheaper, slightly weaker evaluation).
- 'custom': the components named in `attacks`, in the order given.

The host keeps the robust set: before each component (and each target class of
APGD-T and FAB-T) the samples still robust are packed into chunks of
`batch_size`, the last one padded to a multiple of batch_size / 8
(`parallel.remainder_size`), so each component compiles for a few shapes only and little
compute is spent on samples already broken. A candidate counts only after it is
checked on its own: misclassified, inside [0, 1] and within eps of the clean
image (float32 rounding: + 1e-6); the first component that breaks a sample sets
its x_adv, as in the reference. `on_pass` / `done_passes` let a caller save each
pass and resume an interrupted evaluation to the same result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_advprune import parallel
from jax_advprune.attacks.apgd import _apgd
from jax_advprune.attacks.common import check_norm, flat_norm
from jax_advprune.attacks.dispatch import AUTO, resolve_mesh, run_attack
from jax_advprune.attacks.fab import _fab_target, target_classes
from jax_advprune.attacks.square import _square

LogitsFn = Callable[[jax.Array], jax.Array]
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "lite": ("apgd-ce", "apgd-t")}
TARGETED = ("apgd-t", "fab-t")
EPS_SLACK = 1e-6  # float32 rounding allowed on ||x_adv - x|| <= eps

log = logging.getLogger("jax_advprune")


class AutoAttackResult(NamedTuple):
    """What an AutoAttack run found, per sample (N,) and per component.

    x_adv: (N, H, W, C) float32, the adversarial example of each broken sample,
      the clean image elsewhere.
    robust: (N,) bool, classified correctly and not broken by any component.
    clean_correct: (N,) bool, classified correctly without attack.
    broken_by: (N,) int8, index into `attacks` of the component that broke the
      sample; -1 where none did (robust, or misclassified clean).
    attacks: the components run, in order.
    robust_accuracy: robust accuracy (fraction of N) after each component, in order.
    clean_accuracy: fraction of N classified correctly.
    """

    x_adv: np.ndarray
    robust: np.ndarray
    clean_correct: np.ndarray
    broken_by: np.ndarray
    attacks: tuple
    robust_accuracy: tuple
    clean_accuracy: float


def components(version: str, attacks: tuple | list | None = None) -> tuple[str, ...]:
    """The components of a version, checked; `attacks` only (and then required) for 'custom'."""
    if version == "custom":
        if not attacks:
            raise ValueError(f"autoattack version 'custom' needs attacks, a list from {COMPONENTS}")
        unknown = [a for a in attacks if a not in COMPONENTS]
        if unknown or len(set(attacks)) != len(attacks):
            raise ValueError(f"autoattack attacks must be distinct names from {COMPONENTS}, got {list(attacks)}")
        return tuple(attacks)
    if version not in VERSIONS:
        raise ValueError(f"autoattack version must be one of {sorted(VERSIONS) + ['custom']}, got {version!r}")
    if attacks:
        raise ValueError(
            f"autoattack attacks are only for version='custom' (version {version!r} runs {VERSIONS[version]})"
        )
    return VERSIONS[version]


def _predict(logits_fn, x, y, key):
    del y, key
    return jnp.argmax(logits_fn(x), -1)


def _check(logits_fn, x, y, key, *, x_adv, eps, norm):
    """True where x_adv (B, ...) is misclassified, in [0, 1] and within eps (+ EPS_SLACK) of x."""
    del key
    inside = (flat_norm(x_adv - x, norm) <= eps + EPS_SLACK) & jnp.all(
        (x_adv >= 0) & (x_adv <= 1), axis=tuple(range(1, x.ndim))
    )
    return inside & (jnp.argmax(logits_fn(x_adv), -1) != y)


def _apgd_targeted(logits_fn, x, y, key, *, eps, rank, steps, norm, unroll: int | bool = 1):
    """APGD with the targeted DLR loss towards the rank-th most likely clean class."""
    targets = target_classes(logits_fn(x), rank)
    return _apgd(
        logits_fn, x, y, key, eps=eps, steps=steps, norm=norm, loss="dlr_targeted", targets=targets, unroll=unroll
    )


def component(name: str, *, norm: str, apgd_steps: int, fab_steps: int, square_queries: int) -> tuple[Callable, dict]:
    """(traceable attack, its static settings) of AutoAttack component `name`; its dynamic arguments are eps, and
    rank (the target's rank among the clean logits) for 'apgd-t' and 'fab-t'. The reference's settings."""
    if name in ("apgd-ce", "apgd-dlr"):
        return _apgd, dict(steps=apgd_steps, norm=norm, loss=name[5:], targets=None, unroll=1)
    if name == "apgd-t":
        return _apgd_targeted, dict(steps=apgd_steps, norm=norm)
    if name == "fab-t":
        return _fab_target, dict(norm=norm, steps=fab_steps, restarts=1, alpha_max=0.1, eta=1.05, beta=0.9)
    if name == "square":
        return _square, dict(norm=norm, queries=square_queries, p_init=0.8)
    raise ValueError(f"unknown AutoAttack component {name!r}; known: {COMPONENTS}")


def autoattack(
    logits_fn: LogitsFn,
    x,
    y,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: tuple | list | None = None,
    apgd_steps: int = 100,
    num_targets: int = 9,
    fab_steps: int = 100,
    square_queries: int = 5000,
    batch_size: int | None = None,
    mesh=AUTO,
    report: Callable[[str], None] | None = None,
    on_pass: Callable[[int, dict], None] | None = None,
    done_passes: list[dict] | None = None,
) -> AutoAttackResult:
    """Robustness of `logits_fn` on (x, y) under AutoAttack at radius eps.

    Args:
      logits_fn: images (b, H, W, C) in [0, 1] -> logits (b, K); called on chunks of
        `batch_size`. Pass the same object (or a `jax.tree_util.Partial(apply, params)`)
        to reuse the compiled programs.
      x: (N, H, W, C) images, float in [0, 1] or uint8; y: (N,) int labels. Host
        arrays; on several processes every process passes the same ones.
      key: PRNG key; each component, target and chunk folds in its own index.
      eps: radius in units of `norm` (pixel intensities in [0, 1]).
      norm: 'linf' or 'l2'.
      version: 'standard', 'lite' or 'custom' (then `attacks`, names from COMPONENTS).
      apgd_steps, fab_steps: iterations of each APGD / FAB-T run; num_targets:
        target classes of APGD-T and FAB-T (capped at K - 1); square_queries:
        Square's budget per sample. The defaults are the reference's.
      batch_size: chunk size (default min(N, 256)); mesh: 'auto', a Mesh or None,
        as for `pgd`: each chunk is split over its devices.
      report: called with a line after every component (default: the
        'jax_advprune' logger).
      on_pass: called as on_pass(k, {'rows': (m,) int, 'x_adv': (m, H, W, C)}) after
        the k-th pass (a component, or one target class of APGD-T / FAB-T) with the
        samples it broke; save them to resume.
      done_passes: those dicts of passes 0 .. k-1 from an interrupted call with the
        same arguments: they are applied instead of recomputed, and the result is
        the same as an uninterrupted call's (each pass draws from its own key).

    Returns:
      AutoAttackResult (host arrays).
    """
    check_norm(norm)
    names = components(version, attacks)
    if not eps > 0:
        raise ValueError(f"autoattack needs eps > 0, got {eps}")
    for setting, value in (
        ("apgd_steps", apgd_steps),
        ("num_targets", num_targets),
        ("fab_steps", fab_steps),
        ("square_queries", square_queries),
    ):
        if int(value) < 1:
            raise ValueError(f"autoattack {setting} must be >= 1, got {value}")
    images = np.asarray(x)
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    labels = np.asarray(y).astype(np.int32)
    n = len(labels)
    if images.shape[0] != n or n == 0:
        raise ValueError(
            f"autoattack needs x (N, H, W, C) and y (N,) with N >= 1, got {images.shape} and {labels.shape}"
        )
    mesh = resolve_mesh(mesh)
    batch = int(batch_size or min(n, 256))
    num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((batch,) + images.shape[1:], jnp.float32)).shape[-1]
    targets = range(2, min(num_targets, num_classes - 1) + 2)
    report = report or log.info
    if labels.min() < 0 or labels.max() >= num_classes:  # checked before any compute is spent
        raise ValueError(
            f"autoattack labels must lie in [0, {num_classes}) for a {num_classes}-class model, got {labels.min()}..{labels.max()}"
        )
    if "square" in names and (
        images.ndim != 4 or images.shape[1] != images.shape[2] or (norm == "l2" and images.shape[1] < 5)
    ):
        raise ValueError(f"autoattack's Square needs square images (and H >= 5 for L2), got {images.shape[1:]}")

    def on_chunks(impl, rows, dynamic, static, run_key):
        """impl over images[rows] in chunks of `batch` -> its outputs for `rows`, on the host.

        The last chunk is padded only up to `parallel.remainder_size`, so few survivors cost little;
        dynamic(positions) gives the per-call arguments for positions into `rows`."""
        outputs = []
        for index, (positions, valid) in enumerate(parallel.padded_chunks(len(rows), batch, shrink_last=True)):
            chunk = rows[positions]
            out = run_attack(
                impl,
                logits_fn,
                images[chunk],
                labels[chunk],
                jax.random.fold_in(run_key, index),
                dynamic=dynamic(positions),
                static=static,
                mesh=mesh,
            )
            outputs.append(jax.tree_util.tree_map(lambda a: parallel.to_host(a)[valid], out))
        return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)

    def one_pass(index: int, name: str, target: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Component `name` (towards target rank `target`) on the samples still robust -> (rows it broke, their x_adv)."""
        todo = np.flatnonzero(robust)
        if not len(todo):
            return todo, np.zeros((0,) + images.shape[1:], np.float32)
        run_key = jax.random.fold_in(jax.random.fold_in(key, index), target or 0)
        impl, static = component(
            name, norm=norm, apgd_steps=apgd_steps, fab_steps=fab_steps, square_queries=square_queries
        )
        rank = {} if target is None else {"rank": target}
        candidates = on_chunks(impl, todo, lambda positions: dict(eps=eps, **rank), static, run_key)
        candidates = candidates if isinstance(candidates, np.ndarray) else candidates.x_adv
        broken = on_chunks(
            _check, todo, lambda positions: dict(x_adv=candidates[positions], eps=eps), dict(norm=norm), key
        )
        return todo[broken], candidates[broken]

    every = np.arange(n)
    clean_correct = on_chunks(_predict, every, lambda positions: {}, {}, key) == labels
    robust = clean_correct.copy()
    x_adv = images.copy()
    broken_by = np.full(n, -1, np.int8)
    robust_accuracy = []
    started = time.perf_counter()
    done = list(done_passes or [])
    passes = 0
    for index, name in enumerate(names):
        for target in targets if name in TARGETED else [None]:
            if passes < len(done):  # finished by an earlier, interrupted call
                hit, hit_x = np.asarray(done[passes]["rows"], np.int64), np.asarray(done[passes]["x_adv"], np.float32)
            else:
                hit, hit_x = one_pass(index, name, target)
                if on_pass is not None:
                    on_pass(passes, {"rows": hit, "x_adv": hit_x})
            passes += 1
            x_adv[hit] = hit_x
            robust[hit] = False
            broken_by[hit] = index
        robust_accuracy.append(float(robust.mean()))
        report(
            f"[autoattack] after {name}: robust accuracy {robust_accuracy[-1]:.2%} ({int(robust.sum())}/{n}), "
            f"{time.perf_counter() - started:.1f} s"
        )
    return AutoAttackResult(
        x_adv, robust, clean_correct, broken_by, names, tuple(robust_accuracy), float(clean_correct.mean())
    )
