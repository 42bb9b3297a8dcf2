"""Scoring at pool scale: DeepFool margins, feature embedding and kNN extrapolation throughput, with memory.

    pip install -e ".[bench]"
    python benchmarks/scoring.py [--pool-size 1000000] [--queries 1000000] [--refs 20000] [--stages ...] [--allow-busy]

Pool: a generated 32x32x3 pool (`jax_advprune.data.make_pool`, kept in --dir).
Model: the small CNN (32/64/128 channels) PGD-AT trained for --train-steps steps on
the pool, so margins are not trivial. Stages (--stages, comma-separated), each
over the stated number of images, streamed from disk in chunks like the score phase:
  - deepfool: DeepFool L-inf margins (all 10 classes, 50 iterations, work queue), images/s;
  - embedding: penultimate-feature embedding (the extrapolation's default), images/s;
  - knn: kNN (k = 12, Euclidean) of --queries embeddings against --refs references:
    `knn` as the score phase calls it (engine 'auto': faiss on a CPU where it is
    installed), `extrapolate_knn` (the kNN and the extrapolated scores, what the
    score phase runs), the JAX engine, and faiss-cpu `IndexFlatL2` called directly,
    taking turns, with the fraction of identical neighbour sets;
  - memory: peak memory of `extrapolate_knn` streaming --memory-queries queries (default
    1M and 5M) from a memory-mapped embedding file, each in a fresh process, engine
    'auto' (and the JAX engine at the smallest size); 20M extrapolated from the two sizes;
  - wrn: DeepFool L-inf margins with an imported WRN-28-10 (Swish): a checkpoint saved the
    way DM-Improves-AT saves it (random weights and BatchNorm statistics: no trained
    WRN-28-10 can be downloaded here) is imported with `import_torch`; ours (work
    queue, all classes) against foolbox's LinfDeepFoolAttack on the same PyTorch
    weights, on --wrn-images 32x32x3 pool images labelled with the model's own
    predictions, taking turns, with the agreement of the distances.
The kNN uses random embeddings of the model's feature width (its cost does not
depend on the values). Every figure is the median of --repeats runs (at least 3)
with its spread, threads set and checked before each (benchmarks/hygiene.py); the
run refuses to write results if other work ran on the machine (--allow-busy).
Prints a table and writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

if __name__ == "__main__":
    _args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args.add_argument("--pool-size", type=int, default=1_000_000)
    _args.add_argument("--dir", default="/tmp/jax_advprune_bench")
    _args.add_argument("--deepfool-images", type=int, default=4096)
    _args.add_argument("--embed-images", type=int, default=100_000)
    _args.add_argument("--queries", type=int, default=1_000_000)
    _args.add_argument("--memory-queries", type=int, nargs="+", default=[1_000_000, 5_000_000])
    _args.add_argument("--refs", type=int, default=20_000)
    _args.add_argument("--train-steps", type=int, default=100)
    _args.add_argument("--deepfool-iterations", type=int, default=50)
    _args.add_argument("--devices", type=int, default=2 * (os.cpu_count() or 1))
    _args.add_argument("--wrn-images", type=int, default=8)
    _args.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="cores for every side: XLA's pool, PyTorch, faiss"
    )
    _args.add_argument("--stages", default="deepfool,embedding,knn,memory,wrn")
    _args.add_argument("--memory-child", type=int, nargs=2, metavar=("QUERIES", "JAX_ENGINE"), help=argparse.SUPPRESS)
    hygiene.add_arguments(_args)
    ARGS = _args.parse_args()
    CORES = hygiene.use_cores(ARGS.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jax.tree_util import Partial  # noqa: E402
from loader import PeakMemory, pool_paths  # noqa: E402

from jax_advprune import parallel, training  # noqa: E402
from jax_advprune.attacks import deepfool  # noqa: E402
from jax_advprune.data.loader import BatchReader, make_plan  # noqa: E402
from jax_advprune.data.sources import NpzPart, Pool  # noqa: E402
from jax_advprune.models import create_model  # noqa: E402
from jax_advprune.pruning import knn as knn_lib  # noqa: E402
from jax_advprune.pruning import predictions  # noqa: E402
from jax_advprune.pruning.margins import margin_scores  # noqa: E402

EPS = 8 / 255
DIM = 128  # the small CNN's feature width
K = 12


def xla_threads() -> dict:
    return hygiene.xla_threads(ARGS.threads)


def trained_model(pool: Pool, mesh, steps: int):
    model = create_model("small_cnn", num_classes=10, widths=(32, 64, 128), mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = ml_collections.ConfigDict(
        dict(
            loss="pgd_at",
            trades_beta=6.0,
            label_smoothing=0.1,
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            warmup_steps=10,
            ema_decay=0.0,
            ema_warmup_steps=0,
        )
    )
    attack = ml_collections.ConfigDict(dict(norm="linf", eps=EPS, step_size=EPS / 4, steps=3))
    tx = training.make_optimizer(cfg, steps)
    state = training.init_train_state(model, tx, pool.image_shape, seed=0)
    plan = make_plan(
        np.ones(len(pool), bool),
        len(pool),
        batch_size=128,
        original_fraction=None,
        synthetic_with_replacement=True,
        seed=0,
    )
    reader = BatchReader(pool, plan, np.full(len(pool), EPS, np.float32), crop_padding=4, flip=True)
    step = training.make_train_step(model, tx, cfg, attack, mesh)
    for s in range(steps):
        state, metrics = step(state, reader(s))
    print(f"trained {steps} steps: adversarial train accuracy {float(metrics['adv_accuracy']):.3f}", flush=True)
    return model, jax.device_get(state.variables())


def imported_wrn_deepfool(pool: Pool, mesh) -> dict:
    """The wrn stage of the module docstring: a row with both sides' images/s and the distance agreement."""
    import foolbox as fb
    import torch

    from jax_advprune.attacks.common import flat_norm
    from jax_advprune.models import import_torch
    from jax_advprune.models.torch_reference import WideResNet

    torch.manual_seed(0)
    reference = WideResNet(
        num_classes=10,
        depth=28,
        width=10,
        activation="swish",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
    )
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
    logits_fn = Partial(apply_fn, variables)

    def run(_, x, y):
        return deepfool(
            logits_fn, x, y, norm="linf", max_iter=ARGS.deepfool_iterations, overshoot=0.02, slots=slots, mesh=mesh
        )

    jax.block_until_ready(run(variables, x, y).margin)  # compile
    attack = fb.attacks.LinfDeepFoolAttack(steps=ARGS.deepfool_iterations, candidates=10, overshoot=0.02, loss="logits")
    fmodel = fb.PyTorchModel(reference, bounds=(0, 1))
    stats, outputs = hygiene.take_turns(
        {
            "ours": lambda: run(variables, x, y),
            "foolbox": lambda: attack(fmodel, x_t, torch.tensor(y, dtype=torch.long), epsilons=None),
        },
        repeats=ARGS.repeats,
        threads={"ours": xla_threads, "foolbox": lambda: hygiene.torch_threads(ARGS.threads)},
        block=jax.block_until_ready,
    )
    result, (_, fb_adv, fb_success) = outputs["ours"], outputs["foolbox"]
    # The same quantity on both sides: the final point's distance, overshoot included (our margin is
    # ||r_total||, without the overshoot factor 1.02).
    ours_dist = np.asarray(flat_norm(jnp.asarray(np.asarray(result.x_adv) - x), "linf"))
    fb_dist = np.asarray(flat_norm(jnp.asarray(fb_adv.numpy().transpose(0, 2, 3, 1) - x), "linf"))
    both = np.asarray(result.converged) & fb_success.numpy() & (fb_dist > 0)
    rel = np.abs(ours_dist[both] - fb_dist[both]) / fb_dist[both]
    ours_s, fb_s = stats["ours"]["median_s"], stats["foolbox"]["median_s"]
    return dict(
        stage=f"DeepFool L-inf, imported WRN-28-10 (10 classes, <= {ARGS.deepfool_iterations} it.)",
        items=n,
        timing=stats["ours"],
        per_s=n / ours_s,
        hours_per_million=1e6 / (n / ours_s) / 3600,
        baseline="foolbox LinfDeepFoolAttack, same weights",
        baseline_timing=stats["foolbox"],
        baseline_per_s=n / fb_s,
        speed_vs_baseline=fb_s / ours_s,
        import_seconds=import_seconds,
        max_logit_difference_after_import=logit_diff,
        mean_iterations=float(np.asarray(result.n_iter).mean()),
        converged=float(np.asarray(result.converged).mean()),
        distances_compared=int(both.sum()),
        median_rel_diff_vs_foolbox=float(np.median(rel)) if both.any() else None,
        p95_rel_diff_vs_foolbox=float(np.quantile(rel, 0.95)) if both.any() else None,
    )


def knn_stage(mesh, rng) -> list[dict]:
    """The knn stage of the module docstring: a row for `knn`, one for `extrapolate_knn`, each against faiss."""
    import faiss

    refs = rng.normal(size=(ARGS.refs, DIM)).astype(np.float32)
    ref_scores = rng.random(ARGS.refs).astype(np.float32)
    queries = rng.normal(size=(ARGS.queries, DIM)).astype(np.float32)
    engine = knn_lib.knn_engine(mesh, "auto")
    call = dict(k=K, query_chunk=8192, mesh=mesh)
    knn_lib.knn(queries[:8192], refs, engine="jax", **call)  # compile

    def faiss_direct():
        index = faiss.IndexFlatL2(DIM)
        index.add(refs)
        return index.search(queries, K)[1]

    ours_threads = xla_threads if engine == "jax" else lambda: hygiene.faiss_threads(ARGS.threads)
    stats, outputs = hygiene.take_turns(
        {
            "knn": lambda: knn_lib.knn(queries, refs, engine="auto", **call)[1],
            "extrapolate_knn": lambda: knn_lib.extrapolate_knn(queries, refs, ref_scores, engine="auto", **call),
            "jax_engine": lambda: knn_lib.knn(queries, refs, engine="jax", **call)[1],
            "faiss": faiss_direct,
        },
        repeats=ARGS.repeats,
        block=jax.block_until_ready,
        threads={
            "knn": ours_threads,
            "extrapolate_knn": ours_threads,
            "jax_engine": xla_threads,
            "faiss": lambda: hygiene.faiss_threads(ARGS.threads),
        },
    )
    same = lambda a, b: float(np.mean(np.all(np.sort(a, 1) == np.sort(b, 1), axis=1)))  # noqa: E731
    expected_scores = knn_lib.extrapolate(ref_scores, None, outputs["faiss"], "uniform")
    flops = 2.0 * ARGS.queries * ARGS.refs * DIM
    faiss_s = stats["faiss"]["median_s"]
    rows = []
    for side, label, identical in (
        (
            "knn",
            f"knn, k={K}, {ARGS.refs:,} refs x {DIM} dims (engine {engine})",
            same(outputs["knn"], outputs["faiss"]),
        ),
        (
            "extrapolate_knn",
            f"extrapolate_knn, k={K}, {ARGS.refs:,} refs x {DIM} dims (engine {engine})",
            float(np.mean(np.isclose(outputs["extrapolate_knn"], expected_scores, rtol=1e-6, atol=0))),
        ),
        (
            "jax_engine",
            f"knn, JAX engine, k={K}, {ARGS.refs:,} refs x {DIM} dims",
            same(outputs["jax_engine"], outputs["faiss"]),
        ),
    ):
        seconds = stats[side]["median_s"]
        rows.append(
            dict(
                stage=label,
                items=ARGS.queries,
                timing=stats[side],
                per_s=ARGS.queries / seconds,
                hours_per_million=1e6 / (ARGS.queries / seconds) / 3600,
                gflop_s=flops / seconds / 1e9,
                engine=engine if side != "jax_engine" else "jax",
                baseline="faiss IndexFlatL2 called directly",
                baseline_timing=stats["faiss"],
                baseline_per_s=ARGS.queries / faiss_s,
                speed_vs_baseline=faiss_s / seconds,
                identical_to_faiss=identical,
            )
        )
    return rows


def embedding_file(queries: int) -> str:
    """A (queries, DIM) float32 .npy of random embeddings in --dir, written once in chunks -> its path."""
    path = os.path.join(ARGS.dir, f"embedding_{queries}x{DIM}.npy")
    if not os.path.exists(path):
        rng = np.random.default_rng(queries)
        out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float32, shape=(queries, DIM))
        for start in range(0, queries, 1 << 20):
            stop = min(start + (1 << 20), queries)
            out[start:stop] = rng.standard_normal((stop - start, DIM), np.float32)
        out.flush()
        del out
        os.replace(path + ".tmp.npy", path)
    return path


def _memory_status() -> dict[str, int]:
    """RssAnon (heap and device buffers of XLA:CPU) and RssFile (mapped file pages, reclaimable) in bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile")}


def memory_child(queries: int, jax_engine: bool) -> dict:
    """In a fresh process: extrapolate_knn over the memory-mapped embedding file, as the score phase runs it
    (scores of every query in memory), with RssAnon and RssFile sampled every 20 ms."""
    mesh = parallel.make_mesh(ARGS.devices)
    embedding = np.load(embedding_file(queries), mmap_mode="r")
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(ARGS.refs, DIM)).astype(np.float32)
    ref_scores = rng.random(ARGS.refs).astype(np.float32)
    engine = "jax" if jax_engine else "auto"
    knn_lib.extrapolate_knn(
        embedding[:8192], refs, ref_scores, k=K, query_chunk=8192, mesh=mesh, engine=engine
    )  # compile, warm
    baseline = _memory_status()
    peak = dict(baseline)
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            for name, value in _memory_status().items():
                peak[name] = max(peak[name], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    scores = knn_lib.extrapolate_knn(embedding, refs, ref_scores, k=K, query_chunk=8192, mesh=mesh, engine=engine)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    assert scores.shape == (queries,) and np.isfinite(scores).all()
    return dict(
        queries=queries,
        engine=knn_lib.knn_engine(mesh, engine),
        seconds=seconds,
        per_s=queries / seconds,
        rss_anon_before=baseline["RssAnon"],
        rss_anon_peak=peak["RssAnon"],
        rss_anon_growth=peak["RssAnon"] - baseline["RssAnon"],
        rss_file_peak=peak["RssFile"],
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        embedding_file_bytes=os.path.getsize(embedding_file(queries)),
    )


def memory_stage() -> dict:
    """The memory stage of the module docstring -> {'runs': [...], 'extrapolated_20m': {...}}."""
    sizes = sorted(ARGS.memory_queries)
    runs = []
    for queries, jax_engine in [(q, 0) for q in sizes] + [(sizes[0], 1)]:
        embedding_file(queries)
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            str(queries),
            str(jax_engine),
            "--threads",
            str(ARGS.threads),
            "--devices",
            str(ARGS.devices),
            "--refs",
            str(ARGS.refs),
            "--dir",
            ARGS.dir,
            "--allow-busy",
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory stage at {queries} queries failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(
            f"  memory: {r['queries']:,} queries, engine {r['engine']}: RssAnon {r['rss_anon_before'] / 2**20:.0f} -> "
            f"{r['rss_anon_peak'] / 2**20:.0f} MiB, file pages mapped up to {r['rss_file_peak'] / 2**20:.0f} MiB, {r['per_s']:,.0f} queries/s",
            flush=True,
        )
    small, large = runs[0], runs[len(sizes) - 1]  # engine 'auto'; the last run is the JAX engine's
    slope = (large["rss_anon_peak"] - small["rss_anon_peak"]) / max(large["queries"] - small["queries"], 1)
    at_20m = large["rss_anon_peak"] + slope * (20_000_000 - large["queries"])
    return dict(
        runs=runs,
        extrapolated_20m=dict(
            rss_anon_peak=at_20m,
            bytes_per_query=slope,
            from_queries=[small["queries"], large["queries"]],
            how="measured RssAnon peaks at the two sizes, linear in the queries",
        ),
    )


def timed_stage(label: str, items: int, call, **extra) -> dict:
    """A row for a stage of ours alone (no baseline exists for it in this benchmark): median of --repeats runs."""
    stats, output = hygiene.timed(call, repeats=ARGS.repeats, threads=xla_threads, block=jax.block_until_ready)
    per_s = items / stats["median_s"]
    return dict(
        stage=label, items=items, timing=stats, per_s=per_s, hours_per_million=1e6 / per_s / 3600, **extra
    ), output


def print_table(rows: list[dict]) -> None:
    print("| stage | items | median s (best, spread) | items/s | hours per 1M | baseline, same run | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["timing"]
        timing = f"{t['median_s']:.1f} ({t['best_s']:.1f}, {100 * t['spread']:.0f}%)"
        rate = f"{r['per_s']:,.0f}" if r["per_s"] >= 100 else f"{r['per_s']:.3g}"
        baseline = ""
        if "baseline" in r:
            b = r["baseline_timing"]
            baseline = (
                f"{r['baseline']}: {r['baseline_per_s']:,.4g}/s, {b['median_s']:.1f} s ({b['best_s']:.1f}, {100 * b['spread']:.0f}%): "
                f"**{r['speed_vs_baseline']:.2f}x**"
            )
        notes = []
        if "mean_iterations" in r:
            notes.append(f"{r['mean_iterations']:.1f} iterations, {100 * r['converged']:.1f}% converged")
        if "identical_to_faiss" in r:
            notes.append(f"{100 * r['identical_to_faiss']:.1f}% identical to faiss; {r['gflop_s']:.0f} GFLOP/s")
        if "median_rel_diff_vs_foolbox" in r:
            notes.append(
                f"distances vs foolbox: median rel. diff {100 * (r['median_rel_diff_vs_foolbox'] or 0):.2f}% over {r['distances_compared']} "
                f"samples; import {r['import_seconds']:.1f} s, logits within {r['max_logit_difference_after_import']:.1e}"
            )
        print(
            f"| {r['stage']} | {r['items']:,} | {timing} | {rate} | {r['hours_per_million']:.3g} | {baseline} | {'; '.join(notes)} |"
        )


def main() -> None:
    from jax_advprune.main import setup_logging

    if ARGS.memory_child:
        print(json.dumps(memory_child(*ARGS.memory_child)))
        return
    setup_logging()
    guard = hygiene.IdleGuard(ARGS.allow_busy)
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
        # DeepFool margins over a random subset of the pool, chunks of 1,024 read from disk.
        subset = np.sort(rng.choice(len(pool), ARGS.deepfool_images, replace=False))
        deepfool_settings = dict(
            norm="linf", max_iter=ARGS.deepfool_iterations, overshoot=0.02, candidates=None, slots=min(512, len(subset))
        )
        chunk = min(1024, len(subset))
        margin_scores(
            apply_fn, variables, pool, chunk_size=chunk, mesh=mesh, indices=subset[:chunk], **deepfool_settings
        )  # compile
        row, result = timed_stage(
            f"DeepFool L-inf margins, small CNN (10 classes, <= {ARGS.deepfool_iterations} it.)",
            len(subset),
            lambda: margin_scores(
                apply_fn, variables, pool, chunk_size=chunk, mesh=mesh, indices=subset, **deepfool_settings
            ),
        )
        rows.append(
            row | dict(mean_iterations=float(result["n_iter"].mean()), converged=float(result["converged"].mean()))
        )

    if "embedding" in stages:
        features_fn = lambda v, x: model.apply(v, x, train=False, return_features=True)  # noqa: E731
        predict = predictions.Predictor(features_fn, mesh=mesh)
        embed_rows = np.arange(min(ARGS.embed_images, len(pool)))
        predictions.pool_outputs(
            predict, variables, pool, embed_rows[:4096], chunk_size=4096, keep=("features",)
        )  # compile
        rows.append(
            timed_stage(
                "embedding (penultimate features)",
                len(embed_rows),
                lambda: predictions.pool_outputs(
                    predict, variables, pool, embed_rows, chunk_size=4096, keep=("features",)
                ),
            )[0]
        )

    if "knn" in stages:
        rows += knn_stage(mesh, rng)
    memory_report = memory_stage() if "memory" in stages else None
    peak = memory.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    machine_state = guard.finish()

    print(
        f"\n{ARGS.devices} XLA:CPU devices on {ARGS.threads} cores, PyTorch and faiss with {ARGS.threads} threads; pool {len(pool):,} images of "
        f"32x32x3 on disk; median of {ARGS.repeats}, sides taking turns; other processes used {machine_state['others_cores_mean']:.2f} cores "
        f"on average; this process's peak PSS {peak / 2**30:.2f} GiB, RSS {peak_rss / 2**30:.2f} GiB\n"
    )
    print_table(rows)
    if memory_report:
        print(
            "\n| kNN + extrapolation, streamed from a memory-mapped embedding | engine | queries/s | RssAnon before -> peak (MiB) | mapped file pages, peak (MiB) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for r in memory_report["runs"]:
            print(
                f"| {r['queries']:,} queries ({r['embedding_file_bytes'] / 2**30:.2f} GiB file) | {r['engine']} | {r['per_s']:,.0f} | "
                f"{r['rss_anon_before'] / 2**20:.0f} -> {r['rss_anon_peak'] / 2**20:.0f} | {r['rss_file_peak'] / 2**20:.0f} |"
            )
        e = memory_report["extrapolated_20m"]
        print(
            f"| 20,000,000 queries (extrapolated from {e['from_queries'][0]:,} and {e['from_queries'][1]:,}) | | | "
            f"peak {e['rss_anon_peak'] / 2**20:.0f} ({e['bytes_per_query']:.1f} B per query) | |"
        )
    out = hygiene.write_results(
        "scoring.json",
        dict(
            machine=hygiene.machine_record(
                CORES,
                devices=ARGS.devices,
            ),
            machine_state=machine_state,
            settings=vars(ARGS),
            pool_size=len(pool),
            peak_pss_bytes=peak,
            peak_rss_bytes=peak_rss,
            rows=rows,
            knn_memory=memory_report,
        ),
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
