"""Training batches from a pool: keep-mask filter, original/synthetic mixing, augmentation.

The batch at global step s is a pure function of (seed, s): `BatchPlan.indices(s)`
picks global pool indices, `BatchReader` gathers them from the memory-mapped pool
and augments the whole batch at once with numpy. A grain `MapDataset` over step
numbers runs the reader (optionally in worker processes), and its iterator state
is checkpointed so a resumed run continues with exactly the batches it would have
seen.

Mixing (the DM-Improves-AT recipe): each batch holds `original_per_batch` kept
original samples, drawn as a stream of permutations, and the rest kept synthetic
samples, drawn uniformly with replacement or as a stream of permutations. An
epoch is ceil(len(original split) / batch_size) steps, so pruning does not
shorten it. Without mixing, epochs are permutations of the whole kept pool.
"""

from __future__ import annotations

import dataclasses
import functools
import signal

import grain
import numpy as np
from absl import flags

from jax_advprune.data.sources import Pool
from jax_advprune.errors import UserError


class EmptySelectionError(UserError, ValueError):
    """The keep mask leaves nothing to draw a batch from."""


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, stream: int, cycle: int, size: int) -> np.ndarray:
    """The permutation (size,) of pass `cycle` over a stream: a pure function of its arguments.

    Cached (one or two live passes per stream), so a batch costs O(batch), not O(pool).
    """
    permutation = np.random.default_rng([seed, stream, cycle]).permutation(size)
    return permutation.astype(np.int32) if size < 2**31 else permutation


def _permutation_stream(seed: int, stream: int, population: np.ndarray, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of the endless sequence perm_0 ++ perm_1 ++ ... of `population`.

    Pass c over the population is shuffled by (seed, stream, c): in plain epochs
    pass c is epoch c.
    """
    positions = start + np.arange(count)
    cycles, offsets = np.divmod(positions, len(population))
    out = np.empty(count, population.dtype)
    for cycle in np.unique(cycles):
        where = cycles == cycle
        out[where] = population[_permutation(seed, stream, int(cycle), len(population))[offsets[where]]]
    return out


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which global pool indices form the batch of each step.

    Attributes:
      original: kept original-split indices (sorted).
      synthetic: kept synthetic indices (sorted).
      batch_size: global batch size.
      original_per_batch: originals per batch when mixing; None = no mixing.
      synthetic_with_replacement: draw synthetic samples i.i.d. (reference) or as
        a stream of permutations.
      steps_per_epoch: steps that count as one epoch (for schedules and logs).
      seed: base seed.
      pool_size: length of the keep mask the plan was made from.
    """

    original: np.ndarray
    synthetic: np.ndarray
    batch_size: int
    original_per_batch: int | None
    synthetic_with_replacement: bool
    steps_per_epoch: int
    seed: int
    pool_size: int

    @functools.cached_property
    def kept(self) -> np.ndarray:
        """All kept indices (originals first), the population of plain epochs."""
        return np.concatenate([self.original, self.synthetic])

    def indices(self, step: int) -> np.ndarray:
        """Global pool indices (batch_size,) int64 of the batch at `step`.

        Kept originals (and, without replacement, kept synthetic samples) are
        consumed as an endless stream of seeded permutations, so every kept
        sample is visited once before any is visited twice.
        """
        if self.original_per_batch is None:
            return _permutation_stream(self.seed, 0, self.kept, step * self.batch_size, self.batch_size)
        n_orig = self.original_per_batch
        originals = _permutation_stream(self.seed, 1, self.original, step * n_orig, n_orig)
        n_syn = self.batch_size - n_orig
        if self.synthetic_with_replacement:
            rng = np.random.default_rng([self.seed, 2, step])
            synthetic = self.synthetic[rng.integers(0, len(self.synthetic), n_syn)]
        else:
            synthetic = _permutation_stream(self.seed, 3, self.synthetic, step * n_syn, n_syn)
        return np.concatenate([originals, synthetic])


def make_plan(
    keep: np.ndarray,
    num_original: int,
    *,
    batch_size: int,
    original_fraction: float | None,
    synthetic_with_replacement: bool,
    seed: int,
) -> BatchPlan:
    """Builds a BatchPlan from a keep mask (N,) bool over the pool.

    `original_fraction` in (0, 1) mixes round(fraction * batch) kept originals into
    each batch, and an epoch is ceil(num_original / batch_size) steps whatever the
    mask keeps (the DM-Improves-AT definition: pruning does not shorten training).
    None (or a pool without synthetic rows) draws plain epochs over the kept pool,
    ceil(kept / batch_size) steps each.
    """
    keep = np.asarray(keep, bool)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise EmptySelectionError("the keep mask selects no sample: nothing to train on")
    original, synthetic = kept[kept < num_original], kept[kept >= num_original]
    if original_fraction is None or len(keep) == num_original:
        return BatchPlan(
            original,
            synthetic,
            batch_size,
            None,
            synthetic_with_replacement,
            -(-len(kept) // batch_size),
            seed,
            len(keep),
        )
    if not 0.0 < original_fraction < 1.0:
        raise ValueError(f"original_fraction must be in (0, 1) or None, got {original_fraction}")
    original_per_batch = int(round(original_fraction * batch_size))
    if not 0 < original_per_batch < batch_size:
        raise ValueError(f"original_fraction {original_fraction} x batch {batch_size} leaves no room for both kinds")
    if len(original) == 0 or len(synthetic) == 0:
        raise EmptySelectionError(
            f"mixing needs kept samples of both kinds, but {len(original)} original and {len(synthetic)} synthetic are kept; "
            "set original_fraction=None for plain epochs"
        )
    steps_per_epoch = -(-num_original // batch_size)
    return BatchPlan(
        original,
        synthetic,
        batch_size,
        original_per_batch,
        synthetic_with_replacement,
        steps_per_epoch,
        seed,
        len(keep),
    )


def draw_augmentation(rng: np.random.Generator, batch: int, *, crop_padding: int, flip: bool) -> dict[str, np.ndarray]:
    """Per-sample crop offsets `dy`, `dx` (batch,) in [0, 2 * crop_padding] and `flip` (batch,) bool."""
    dy = rng.integers(0, 2 * crop_padding + 1, batch)
    dx = rng.integers(0, 2 * crop_padding + 1, batch)
    return {"dy": dy, "dx": dx, "flip": rng.random(batch) < 0.5 if flip else np.zeros(batch, bool)}


def apply_augmentation(images: np.ndarray, draws: dict[str, np.ndarray], *, crop_padding: int) -> np.ndarray:
    """Crop after zero padding at the drawn offsets, then flip where drawn: (B, H, W, C) uint8 -> same."""
    b, h, w, _ = images.shape
    out = images
    if crop_padding > 0:
        padded = np.pad(images, ((0, 0), (crop_padding,) * 2, (crop_padding,) * 2, (0, 0)))
        rows = (draws["dy"][:, None] + np.arange(h))[:, :, None]
        cols = (draws["dx"][:, None] + np.arange(w))[:, None, :]
        out = padded[np.arange(b)[:, None, None], rows, cols]
    if draws["flip"].any():
        out = np.where(draws["flip"][:, None, None, None], out[:, :, ::-1], out)
    return out


@dataclasses.dataclass
class BatchReader:
    """Step number -> batch dict for this process's share of the global batch.

    The dict holds `image` (b, H, W, C) uint8, `label` (b,) int32, `eps` (b,) float32
    (the per-sample training eps) and `index` (b,) int64 (global pool position),
    with b = batch_size // process_count.
    """

    pool: Pool
    plan: BatchPlan
    eps: np.ndarray
    crop_padding: int = 0
    flip: bool = False
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        where = f"a pool of {len(self.pool)} samples ({', '.join(p.name for p in self.pool.parts)})"
        if self.plan.pool_size != len(self.pool):
            raise ValueError(
                f"the keep mask has {self.plan.pool_size} entries but it selects from {where}: one entry per pool sample expected"
            )
        if np.shape(self.eps) != (len(self.pool),):
            raise ValueError(
                f"the eps array has shape {np.shape(self.eps)} but it applies to {where}: shape ({len(self.pool)},) expected"
            )

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        share = self.plan.batch_size // self.process_count
        mine = slice(self.process_index * share, (self.process_index + 1) * share)
        indices = self.plan.indices(int(step))[mine]
        images, labels = self.pool.read(indices)
        # Drawn for the whole global batch, then sliced: batches do not depend on the process count.
        rng = np.random.default_rng([self.plan.seed, 4, int(step)])
        draws = draw_augmentation(rng, self.plan.batch_size, crop_padding=self.crop_padding, flip=self.flip)
        images = apply_augmentation(images, {k: v[mine] for k, v in draws.items()}, crop_padding=self.crop_padding)
        return {
            "image": images,
            "label": labels.astype(np.int32),
            "eps": np.asarray(self.eps[indices], np.float32),
            "index": indices,
        }


def _leave_sigterm_to_the_parent(worker_index: int, worker_count: int) -> None:
    """A grain worker ignores SIGTERM: a preemption signalled to the whole process group (SLURM, Kubernetes) is the
    main process's to handle, which may need batches for one more step before it saves; grain stops its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_iterator(reader: BatchReader, num_steps: int, *, num_workers: int = 0):
    """A checkpointable grain iterator over the batches of steps [0, num_steps)."""
    if reader.plan.batch_size % reader.process_count:
        raise ValueError(f"batch size {reader.plan.batch_size} is not divisible by {reader.process_count} processes")
    dataset = grain.MapDataset.range(num_steps).map(reader)
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=2))
    if num_workers > 0:
        # grain 0.2.18 worker start-up reads absl flags (grain issue 1355): outside
        # absl.app.run they are unparsed and the workers crash.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_leave_sigterm_to_the_parent
        )
    return iter(iter_dataset)
