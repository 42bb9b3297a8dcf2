"""Scoring at pool scale: DeepFool margins, feature embedding and kNN extrapolation throughput, with peak memory.

    pip install -e ".[bench]"
    python benchmarks/scoring.py [--pool-size 1000000] [--deepfool-images 20000] [--queries 1000000] [--refs 20000]

Pool: a generated 32x32x3 pool (`jax_advprune.data.make_pool`, kept in --dir).
Model: the small CNN (32/64/128 channels) PGD-AT trained for --train-steps steps on
the pool, so margins are not trivial. Measured, each over the stated number of
images, streamed from disk in chunks like the score phase:
  - DeepFool L-inf margins (all 10 classes, 50 iterations, work queue), images/s;
  - penultimate-feature embedding (the extrapolation's default), images/s;
  - kNN (k = 12, Euclidean) of --queries embeddings against --refs references:
    `knn` as the score phase calls it (engine 'auto': faiss on a CPU where it is
    installed), its JAX engine, and faiss-cpu `IndexFlatL2` called directly,
    taking turns, median of 3, with the fraction of identical neighbour sets;
  - DeepFool L-inf margins with an imported WRN-28-10 (Swish): a checkpoint saved the
    way DM-Improves-AT saves it (random weights and BatchNorm statistics: no trained
    WRN-28-10 can be downloaded here) is imported with `import_torch`; ours (work
    queue, all classes) against foolbox's LinfDeepFoolAttack on the same PyTorch
    weights, on --wrn-images 32x32x3 pool images labelled with the model's own
    predictions, with the agreement of the distances (--wrn-images 0 skips it);
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
    _args.add_argument("--wrn-images", type=int, default=8)
    _args.add_argument("--wrn-repeats", type=int, default=3)
    _args.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads for foolbox")
    _args.add_argument("--stages", default="deepfool,embedding,knn,wrn")
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


def imported_wrn_deepfool(pool: Pool, mesh) -> dict:
    """The WRN-28-10 stage of the module docstring: a row with both sides' images/s and the distance agreement."""
    import foolbox as fb
    import torch

    from jax_advprune.attacks.common import flat_norm
    from jax_advprune.models import import_torch
    from jax_advprune.models.torch_reference import WideResNet

    torch.manual_seed(0)
    reference = WideResNet(num_classes=10, depth=28, width=10, activation="swish", mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    reference.eval()
    path = os.path.join(ARGS.dir, "wrn28_10_dm_improves_at.pt")
    torch.save({"model_state_dict": torch.nn.DataParallel(torch.nn.Sequential(reference)).state_dict()}, path)
    start = time.perf_counter()
    model, variables = import_torch(path, name="wrn28_10", activation="swish")
    import_seconds = time.perf_counter() - start
    n = ARGS.wrn_images
    images, _ = pool.read(np.arange(n))
    x = images.astype(np.float32) / 255.0
    x_t = torch.tensor(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        logits_t = reference(x_t)
    y = logits_t.argmax(1).numpy().astype(np.int32)  # every sample starts classified "correctly"
    apply_fn = lambda v, z: model.apply(v, z, train=False)  # noqa: E731
    logit_diff = float(np.abs(np.asarray(apply_fn(variables, x)) - logits_t.numpy()).max())
    slots = max(n // ARGS.devices, 1) * ARGS.devices
    run = deepfool_runner(apply_fn, slots=slots, norm="linf", max_iter=ARGS.deepfool_iterations, overshoot=0.02, candidates=None, mesh=mesh)
    jax.block_until_ready(run(variables, x, y).margin)  # compile
    ours_times, fb_times = [], []
    attack = fb.attacks.LinfDeepFoolAttack(steps=ARGS.deepfool_iterations, candidates=10, overshoot=0.02, loss="logits")
    fmodel = fb.PyTorchModel(reference, bounds=(0, 1))
    for _ in range(ARGS.wrn_repeats):  # the two sides take turns
        start = time.perf_counter()
        result = run(variables, x, y)
        jax.block_until_ready(result.margin)
        ours_times.append(time.perf_counter() - start)
        torch.set_num_threads(ARGS.threads)
        assert torch.get_num_threads() == ARGS.threads, (torch.get_num_threads(), ARGS.threads)
        start = time.perf_counter()
        _, fb_adv, fb_success = attack(fmodel, x_t, torch.tensor(y, dtype=torch.long), epsilons=None)
        fb_times.append(time.perf_counter() - start)
    # The same quantity on both sides: the final point's distance, overshoot included (our margin is
    # ||r_total||, without the overshoot factor 1.02).
    ours_dist = np.asarray(flat_norm(jnp.asarray(np.asarray(result.x_adv) - x), "linf"))
    fb_dist = np.asarray(flat_norm(jnp.asarray(fb_adv.numpy().transpose(0, 2, 3, 1) - x), "linf"))
    both = np.asarray(result.converged) & fb_success.numpy() & (fb_dist > 0)
    rel = np.abs(ours_dist[both] - fb_dist[both]) / fb_dist[both]
    ours_s, fb_s = float(np.median(ours_times)), float(np.median(fb_times))
    return dict(stage=f"DeepFool L-inf, imported WRN-28-10 (10 classes, <= {ARGS.deepfool_iterations} it.)", items=n, seconds=ours_s, per_s=n / ours_s,
                hours_per_million=1e6 / (n / ours_s) / 3600, ours_seconds_all=ours_times, foolbox_seconds_all=fb_times,
                foolbox_per_s=n / fb_s, speed_vs_foolbox=fb_s / ours_s, torch_threads=ARGS.threads, import_seconds=import_seconds,
                max_logit_difference_after_import=logit_diff, mean_iterations=float(np.asarray(result.n_iter).mean()),
                converged=float(np.asarray(result.converged).mean()), distances_compared=int(both.sum()),
                median_rel_diff_vs_foolbox=float(np.median(rel)) if both.any() else None,
                p95_rel_diff_vs_foolbox=float(np.quantile(rel, 0.95)) if both.any() else None)


def knn_stage(mesh, rng) -> dict:
    """kNN of --queries random embeddings against --refs references (k = 12, Euclidean): `knn` as the score phase
    calls it (engine 'auto'), its JAX engine, and faiss's IndexFlatL2 called directly, taking turns, median of 3."""
    import faiss

    dim = 128  # the small CNN's feature width
    refs = rng.normal(size=(ARGS.refs, dim)).astype(np.float32)
    queries = rng.normal(size=(ARGS.queries, dim)).astype(np.float32)
    engine = knn_lib.knn_engine(mesh, "auto")
    knn_lib.knn(queries[:8192], refs, k=12, query_chunk=8192, mesh=mesh, engine="jax")  # compile
    times = {"ours": [], "jax_engine": [], "faiss": []}
    results = {}
    for _ in range(3):
        for side in times:
            start = time.perf_counter()
            if side == "faiss":
                faiss.omp_set_num_threads(ARGS.threads)
                assert faiss.omp_get_max_threads() == ARGS.threads, (faiss.omp_get_max_threads(), ARGS.threads)
                index = faiss.IndexFlatL2(dim)
                index.add(refs)
                results[side] = index.search(queries, 12)[1]
            else:
                results[side] = knn_lib.knn(queries, refs, k=12, query_chunk=8192, mesh=mesh, engine="auto" if side == "ours" else "jax")[1]
            times[side].append(time.perf_counter() - start)
    same = lambda a, b: float(np.mean(np.all(np.sort(a, 1) == np.sort(b, 1), axis=1)))  # noqa: E731
    median = {side: float(np.median(t)) for side, t in times.items()}
    flops = 2.0 * ARGS.queries * ARGS.refs * dim
    return dict(stage=f"kNN k=12, {ARGS.refs:,} refs x {dim} dims (engine {engine})", items=ARGS.queries, seconds=median["ours"],
                per_s=ARGS.queries / median["ours"], gflop_s=flops / median["ours"] / 1e9, engine=engine, seconds_all=times,
                faiss_per_s=ARGS.queries / median["faiss"], speed_vs_faiss=median["faiss"] / median["ours"],
                jax_engine_per_s=ARGS.queries / median["jax_engine"], jax_engine_vs_faiss=median["faiss"] / median["jax_engine"],
                faiss_threads=ARGS.threads, same_neighbours_as_faiss=same(results["ours"], results["faiss"]),
                jax_engine_same_neighbours_as_faiss=same(results["jax_engine"], results["faiss"]))


def main() -> None:
    from jax_advprune.main import setup_logging

    setup_logging()
    stages = set(ARGS.stages.split(","))
    memory = PeakMemory(every_s=0.5)
    paths = pool_paths(ARGS.dir, ARGS.pool_size)
    pool = Pool([NpzPart(p, 10) for p in paths], num_original=len(NpzPart(paths[0], 10)))
    mesh = parallel.make_mesh(ARGS.devices)
    rows = []
    if "wrn" in stages and ARGS.wrn_images:
        rows.append(imported_wrn_deepfool(pool, mesh))
    if stages & {"deepfool", "embedding"}:
        model, variables = trained_model(pool, mesh, ARGS.train_steps)
    apply_fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    rng = np.random.default_rng(0)

    if "deepfool" in stages:
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

    if "embedding" in stages:
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

    if "knn" in stages:
        rows.append(knn_stage(mesh, rng))
    peak = memory.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    queries_note = f" (the kNN's {ARGS.queries:,} x 128 float32 queries alone take {ARGS.queries * 128 * 4 / 2**30:.2f} GiB)" if "knn" in stages else ""
    print(f"\n{ARGS.devices} XLA:CPU devices; pool {len(pool):,} images of 32x32x3 on disk; peak memory: PSS {peak / 2**30:.2f} GiB, "
          f"RSS {peak_rss / 2**30:.2f} GiB{queries_note}\n")
    print("| stage | items | seconds | items/s | hours per 1M | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        notes = []
        if "mean_iterations" in r:
            notes.append(f"{r['mean_iterations']:.1f} iterations, {100 * r['converged']:.1f}% converged")
        if "gflop_s" in r:
            notes.append(f"{r['gflop_s']:.0f} GFLOP/s")
        if "foolbox_per_s" in r:
            notes.append(f"foolbox LinfDeepFoolAttack on the same weights {r['foolbox_per_s']:.2f}/s ({r['speed_vs_foolbox']:.2f}x, median of "
                         f"{len(r['ours_seconds_all'])}), distance median rel. diff {100 * (r['median_rel_diff_vs_foolbox'] or 0):.2f}% over "
                         f"{r['distances_compared']} samples; import {r['import_seconds']:.1f} s, logits within {r['max_logit_difference_after_import']:.1e}")
        if "faiss_per_s" in r:
            notes.append(f"faiss IndexFlatL2 called directly {r['faiss_per_s']:,.0f}/s ({r['speed_vs_faiss']:.2f}x), same neighbours "
                         f"{100 * r['same_neighbours_as_faiss']:.1f}%; the JAX engine {r['jax_engine_per_s']:,.0f}/s ({r['jax_engine_vs_faiss']:.2f}x, "
                         f"same neighbours {100 * r['jax_engine_same_neighbours_as_faiss']:.1f}%); median of 3, sides taking turns")
        hours = f"{r['hours_per_million']:.2f}" if "hours_per_million" in r else f"{1e6 / r['per_s'] / 3600:.3f}"
        rate = f"{r['per_s']:,.0f}" if r['per_s'] >= 100 else f"{r['per_s']:.3g}"
        print(f"| {r['stage']} | {r['items']:,} | {r['seconds']:.1f} | {rate} | {hours} | {'; '.join(notes)} |")
    out = os.path.join(REPO, "benchmarks", "results", "scoring.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__, devices=ARGS.devices),
                       settings=vars(ARGS), pool_size=len(pool), peak_pss_bytes=peak, peak_rss_bytes=peak_rss, rows=rows), f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
