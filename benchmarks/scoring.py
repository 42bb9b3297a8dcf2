"""Scoring at pool scale: DeepFool margins, feature embedding and kNN extrapolation throughput, with peak memory.

    pip install -e ".[bench]"
    python benchmarks/scoring.py [--pool-size 1000000] [--deepfool-images 20000] [--queries 1000000] [--refs 20000]

Pool: a generated 32x32x3 pool (`jax_advprune.data.make_pool`, kept in --dir).
Model: the small CNN (32/64/128 channels) PGD-AT trained for --train-steps steps on
the pool, so margins are not trivial. Measured, each over the stated number of
images, streamed from disk in chunks like the score phase:
  - DeepFool L-inf margins (all 10 classes, 50 iterations, work queue), images/s;
  - penultimate-feature embedding (the extrapolation's default), images/s;
  - kNN (k = 12, Euclidean) of --queries embeddings against --refs references,
    queries/s and GFLOP/s of the distance matmuls; the same search with
    faiss-cpu `IndexFlatL2` (exact, the usual tool) in the same run, with the
    fraction of identical neighbour lists;
  - peak memory over the whole run: PSS sampled every 0.5 s and the peak RSS.
The kNN uses random embeddings of the model's feature width (its cost does not
depend on the values). Prints a table and writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--pool-size", type=int, default=1_000_000)
    _args.add_argument("--dir", default="/tmp/jax_advprune_bench")
    _args.add_argument("--deepfool-images", type=int, default=4096)
    _args.add_argument("--embed-images", type=int, default=100_000)
    _args.add_argument("--queries", type=int, default=1_000_000)
    _args.add_argument("--refs", type=int, default=20_000)
    _args.add_argument("--train-steps", type=int, default=100)
    _args.add_argument("--deepfool-iterations", type=int, default=50)
    _args.add_argument("--devices", type=int, default=2 * (os.cpu_count() or 1))
    ARGS = _args.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader import PeakMemory, pool_paths  # noqa: E402

from jax_advprune import parallel, training  # noqa: E402
from jax_advprune.data.loader import BatchReader, make_plan  # noqa: E402
from jax_advprune.data.sources import NpzPart, Pool  # noqa: E402
from jax_advprune.metrics import Progress  # noqa: E402
from jax_advprune.models import create_model  # noqa: E402
from jax_advprune.pruning import knn as knn_lib  # noqa: E402
from jax_advprune.pruning import predictions  # noqa: E402
from jax_advprune.pruning.margins import deepfool_runner, margin_scores  # noqa: E402

EPS = 8 / 255


def trained_model(pool: Pool, mesh, steps: int):
    model = create_model("small_cnn", num_classes=10, widths=(32, 64, 128), mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = ml_collections.ConfigDict(dict(loss="pgd_at", trades_beta=6.0, label_smoothing=0.1, lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4, warmup_steps=10, ema_decay=0.0, ema_warmup_steps=0))
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=EPS, step_size=EPS / 4, steps=3))
    tx = training.make_optimizer(cfg, steps)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    plan = make_plan(np.ones(len(pool), bool), len(pool), batch_size=128, original_fraction=None, synthetic_with_replacement=True, seed=0)
    reader = BatchReader(pool, plan, np.full(len(pool), EPS, np.float32), crop_padding=4, flip=True)
    step = training.make_train_step(model, tx, cfg, attack, mesh)
    for s in range(steps):
        state, metrics = step(state, reader(s))
    print(f"trained {steps} steps: adversarial train accuracy {float(metrics['adv_accuracy']):.3f}", flush=True)
    return model, jax.device_get(state.variables())


def main() -> None:
    from jax_advprune.main import setup_logging

    setup_logging()
    memory = PeakMemory(every_s=0.5)
    paths = pool_paths(ARGS.dir, ARGS.pool_size)
    pool = Pool([NpzPart(p, 10) for p in paths], num_original=len(NpzPart(paths[0], 10)))
    mesh = parallel.make_mesh(ARGS.devices)
    model, variables = trained_model(pool, mesh, ARGS.train_steps)
    apply_fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    rows = []
    rng = np.random.default_rng(0)

    # DeepFool margins over a random subset of the pool, chunks of 4,096 read from disk.
    subset = np.sort(rng.choice(len(pool), ARGS.deepfool_images, replace=False))
    run = deepfool_runner(apply_fn, slots=512, norm="linf", max_iter=ARGS.deepfool_iterations, overshoot=0.02, candidates=None, mesh=mesh)
    chunk = min(1024, len(subset))
    margin_scores(run, variables, pool, chunk_size=chunk, mesh=mesh, indices=subset[:chunk])  # compile
    start = time.perf_counter()
    progress = Progress("deepfool", -(-len(subset) // chunk), chunk, every_s=10.0)
    result = margin_scores(run, variables, pool, chunk_size=chunk, mesh=mesh, indices=subset, progress=progress)
    seconds = time.perf_counter() - start
    rows.append(dict(stage=f"DeepFool L-inf margins (10 classes, <= {ARGS.deepfool_iterations} it.)", items=len(subset), seconds=seconds, per_s=len(subset) / seconds,
                     mean_iterations=float(result["n_iter"].mean()), converged=float(result["converged"].mean()),
                     hours_per_million=1e6 / (len(subset) / seconds) / 3600))

    # Penultimate-feature embedding.
    features_fn = lambda v, x: model.apply(v, x, train=False, return_features=True)  # noqa: E731
    predict = predictions.Predictor(features_fn, mesh=mesh)
    embed_rows = np.arange(min(ARGS.embed_images, len(pool)))
    predictions.pool_outputs(predict, variables, pool, embed_rows[:4096], chunk_size=4096, keep=("features",))  # compile
    start = time.perf_counter()
    embedded = predictions.pool_outputs(predict, variables, pool, embed_rows, chunk_size=4096, keep=("features",))["features"]
    seconds = time.perf_counter() - start
    rows.append(dict(stage="embedding (penultimate features)", items=len(embed_rows), seconds=seconds, per_s=len(embed_rows) / seconds,
                     hours_per_million=1e6 / (len(embed_rows) / seconds) / 3600))

    # kNN extrapolation: random embeddings of the feature width.
    dim = embedded.shape[1]
    refs = rng.normal(size=(ARGS.refs, dim)).astype(np.float32)
    queries = rng.normal(size=(ARGS.queries, dim)).astype(np.float32)
    knn_lib.knn(queries[:8192], refs, k=12, query_chunk=8192, mesh=mesh)  # compile
    start = time.perf_counter()
    dist, idx = knn_lib.knn(queries, refs, k=12, query_chunk=8192, mesh=mesh)
    seconds = time.perf_counter() - start
    flops = 2.0 * ARGS.queries * ARGS.refs * dim
    knn_row = dict(stage=f"kNN k=12, {ARGS.refs:,} refs x {dim} dims", items=ARGS.queries, seconds=seconds, per_s=ARGS.queries / seconds,
                   gflop_s=flops / seconds / 1e9)
    try:
        import faiss

        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index = faiss.IndexFlatL2(dim)
        index.add(refs)
        start = time.perf_counter()
        _, faiss_idx = index.search(queries, 12)
        faiss_seconds = time.perf_counter() - start
        knn_row.update(faiss_seconds=faiss_seconds, faiss_per_s=ARGS.queries / faiss_seconds, speed_vs_faiss=faiss_seconds / seconds,
                       same_neighbours_as_faiss=float(np.mean(np.all(np.sort(faiss_idx, 1) == np.sort(idx, 1), axis=1))))
    except ImportError:
        print("faiss-cpu not installed: no yardstick for the kNN", flush=True)
    rows.append(knn_row)
    peak = memory.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"\n{ARGS.devices} XLA:CPU devices; pool {len(pool):,} images of 32x32x3 on disk; peak memory: PSS {peak / 2**30:.2f} GiB, "
          f"RSS {peak_rss / 2**30:.2f} GiB (the kNN's {ARGS.queries:,} x {dim} float32 queries alone take {ARGS.queries * dim * 4 / 2**30:.2f} GiB)\n")
    print("| stage | items | seconds | items/s | hours per 1M | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        notes = []
        if "mean_iterations" in r:
            notes.append(f"{r['mean_iterations']:.1f} iterations, {100 * r['converged']:.1f}% converged")
        if "gflop_s" in r:
            notes.append(f"{r['gflop_s']:.0f} GFLOP/s")
        if "faiss_per_s" in r:
            notes.append(f"faiss IndexFlatL2 {r['faiss_per_s']:,.0f}/s ({r['speed_vs_faiss']:.2f}x), same neighbours {100 * r['same_neighbours_as_faiss']:.1f}%")
        hours = f"{r['hours_per_million']:.2f}" if "hours_per_million" in r else f"{1e6 / r['per_s'] / 3600:.3f}"
        print(f"| {r['stage']} | {r['items']:,} | {r['seconds']:.1f} | {r['per_s']:,.0f} | {hours} | {'; '.join(notes)} |")
    out = os.path.join(REPO, "benchmarks", "results", "scoring.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__, devices=ARGS.devices),
                       settings=vars(ARGS), pool_size=len(pool), peak_pss_bytes=peak, peak_rss_bytes=peak_rss, rows=rows), f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
