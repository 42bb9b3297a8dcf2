"""Loader throughput and memory on a generated pool: jax_advprune's grain loader vs the reference's.

    pip install -e ".[bench]"
    python benchmarks/loader.py                  # 1M-image pool (2.9 GB on disk)
    python benchmarks/loader.py --size 5000000   # 5M images (14 GB on disk)
    python benchmarks/loader.py --size 200000 --gcs --skip-reference   # also from gs:// (loopback emulator)

Builds the pool once with `python -m jax_advprune.data.make_pool` (32x32x3, in
parts of at most 1M images) under --dir, keeps a random 30% of it, and streams
batches of 512 with augmentation (random crop with padding 4, flip) and per-
sample eps, in the DM-Improves-AT mix (30% originals per batch from the first
50k rows, synthetic drawn with replacement), with 0 and 2 grain workers.

Baseline, same run: what the DM-Improves-AT reference does, i.e. the pool
loaded into RAM (`np.load`), a `torch.utils.data.Subset` of the kept rows, and
per-sample transforms (ToTensor, RandomCrop(32, padding=4), RandomHorizontalFlip,
written with torch ops because the registry's torchvision wheel does not load
with the CPU torch) in a `DataLoader` with the same batch and worker counts.

Each configuration runs in a fresh process, --repeats times (at least 3), the
configurations taking turns; reported: the median images/s with its spread and
the highest peak memory. Memory is the peak, sampled every 50 ms, of the
proportional set size (PSS) summed over that process and its workers (shared
pages counted once), plus the main process's peak RSS from getrusage. The page
cache (file data the kernel keeps) is not process memory and is not counted; the
pool's files are read once before the timings, so every round reads them from the
page cache (a pool that fits it, or a fast local SSD).
Every process runs on --threads cores (checked); the reference's PyTorch runs 1
intra-op thread per process (set and checked: its transforms are per sample);
the cores each configuration kept busy are recorded. The run refuses to write
results if other work ran on the machine (--allow-busy; see benchmarks/hygiene.py).
Prints a table and writes benchmarks/results/loader_<size>.json.

--gcs adds jax_advprune reading the same pool from gs:// (rows "jax_advprune
gs://"): a Cloud Storage emulator (gcp-storage-emulator with the behaviours
tests/gcs_emulator.py adds, in memory) is started on 127.0.0.1 and the parts are
uploaded to it. Each batch's rows become byte ranges, merged when close, fetched
concurrently. Loopback only: no network latency or bandwidth limit, but the
emulator (a Python HTTP server) runs on the same cores as the loader and its
memory is not in the peak PSS column. Writes loader_<size>_gcs.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hygiene  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NUM_ORIGINAL = 50_000
PART_ROWS = 1_000_000


class PeakMemory:
    """Samples the summed PSS of this process and its descendants in a thread; `.peak` in bytes."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self._process, self._every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._process] + self._process.children(recursive=True):
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self._every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def pool_paths(directory: str, size: int) -> list[str]:
    """Generates the pool (once) and returns its part paths."""
    from jax_advprune.data.make_pool import make_pool, part_paths

    parts = -(-size // PART_ROWS)
    out = os.path.join(directory, f"pool_{size}.npz")
    paths = part_paths(out, parts)
    if not all(os.path.exists(p) for p in paths):
        start = time.perf_counter()
        make_pool(out, size, parts=parts)
        print(f"generated {size} images in {time.perf_counter() - start:.0f}s: {paths}", flush=True)
    return paths


def warm_page_cache(paths: list[str]) -> None:
    """Reads every part once, so that every configuration and round reads the pool from the page cache: the
    reference loads the whole pool into RAM before its timing starts, ours streams it while timed."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    print(
        f"page cache warmed: read {sum(os.path.getsize(p) for p in paths) / 2**30:.1f} GiB in {time.perf_counter() - start:.0f} s",
        flush=True,
    )


def start_emulator() -> tuple[subprocess.Popen, str]:
    """Starts the Cloud Storage emulator (tests/gcs_emulator.py) on a free loopback port and points gcsfs at it, in
    this process and the configurations' processes, which inherit the environment -> (process, 'gs://bench')."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import gcs_emulator

    server, url = gcs_emulator.start("bench")
    atexit.register(server.kill)  # also when a configuration fails
    os.environ.update(gcs_emulator.client_environment(url))
    return server, "gs://bench"


def upload(paths: list[str], bucket: str) -> list[str]:
    from jax_advprune import storage

    start = time.perf_counter()
    urls = [f"{bucket}/{os.path.basename(p)}" for p in paths]
    for path, url in zip(paths, urls):
        storage.filesystem(url).put_file(path, url)
    print(
        f"uploaded {sum(os.path.getsize(p) for p in paths) / 2**30:.2f} GiB to the emulator in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return urls


def timed_cache_copy(urls: list[str], directory: str) -> dict:
    """What data.cache_dir costs once per host: every part copied from the bucket into a fresh local directory,
    after which a run reads the local copies (the 'jax_advprune' rows)."""
    import shutil
    import tempfile

    from jax_advprune import storage

    cache = tempfile.mkdtemp(prefix="cache_", dir=directory)
    try:
        start = time.perf_counter()
        copies = [storage.local_copy(url, cache) for url in urls]
        seconds = time.perf_counter() - start
        size = sum(os.path.getsize(c) for c in copies)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(
        f"data.cache_dir copy: {size / 2**30:.2f} GiB in {seconds:.1f} s ({size / 2**20 / seconds:.0f} MiB/s)",
        flush=True,
    )
    return {"bytes": size, "seconds": round(seconds, 2), "mib_per_s": round(size / 2**20 / seconds, 1)}


def keep_mask(size: int, keep: float) -> np.ndarray:
    return np.random.default_rng(0).random(size) < keep


def timed_batches(iterator, steps: int) -> dict:
    """Draws `steps` batches -> {'seconds': wall time, 'cores_busy': CPU seconds of this process tree per wall second}."""
    cpu, start = hygiene.tree_cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cores_busy": round((hygiene.tree_cpu_seconds() - cpu) / seconds, 2)}


def run_ours(paths: list[str], keep: float, batch: int, workers: int, steps: int, warmup: int) -> dict:
    from jax_advprune.data.loader import BatchReader, batch_iterator, make_plan
    from jax_advprune.data.sources import NpzPart, Pool

    pool = Pool([NpzPart(p, 10) for p in paths], num_original=NUM_ORIGINAL)
    mask = keep_mask(len(pool), keep)
    plan = make_plan(
        mask, NUM_ORIGINAL, batch_size=batch, original_fraction=0.3, synthetic_with_replacement=True, seed=0
    )
    reader = BatchReader(pool, plan, np.full(len(pool), 8 / 255, np.float32), crop_padding=4, flip=True)
    iterator = batch_iterator(reader, warmup + steps, num_workers=workers)
    for _ in range(warmup):
        batch_dict = next(iterator)
    assert mask[batch_dict["index"]].all() and batch_dict["image"].dtype == np.uint8
    timing = timed_batches(iterator, steps)
    iterator.close()
    return timing


def run_reference(paths: list[str], keep: float, batch: int, workers: int, steps: int, warmup: int) -> dict:
    import torch

    images = np.concatenate([np.load(p)["image"] for p in paths])  # the reference concatenates everything in RAM
    labels = np.concatenate([np.load(p)["label"] for p in paths])

    class InMemory(torch.utils.data.Dataset):
        """Per-sample ToTensor + RandomCrop(32, padding=4) + RandomHorizontalFlip, as torchvision does them."""

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            image = torch.nn.functional.pad(torch.from_numpy(images[i]).permute(2, 0, 1).float().div(255), (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = image[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, int(labels[i])

    kept = np.flatnonzero(keep_mask(len(labels), keep))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(InMemory(), kept),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    return timed_batches(iterator, steps)


def child(spec: dict) -> dict:
    """Runs one configuration in this (fresh) process and returns its measurements."""
    memory = PeakMemory()
    fn = run_ours if spec["loader"].startswith("jax_advprune") else run_reference
    threads = hygiene.check_cores(spec["threads"]) | {"workers": spec["workers"]}
    if fn is run_reference:
        import torch

        torch.set_num_threads(1)
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"PyTorch runs {torch.get_num_threads()} threads, the benchmark set 1")
        threads["torch_threads"] = 1
    out = fn(spec["paths"], spec["keep"], spec["batch"], spec["workers"], spec["steps"], spec["warmup"])
    out["threads"] = threads
    out["peak_pss_bytes"] = memory.stop()
    out["main_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["images_per_s"] = spec["steps"] * spec["batch"] / out["seconds"]
    out["timed_batches"] = spec["steps"]
    return out


def measure(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{spec['loader']} with {spec['workers']} workers failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="pool images")
    parser.add_argument(
        "--dir", default="/tmp/jax_advprune_bench", help="where the generated pool lives (kept between runs)"
    )
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores every configuration runs on")
    parser.add_argument("--skip-reference", action="store_true", help="skip the PyTorch in-RAM baseline")
    parser.add_argument(
        "--gcs", action="store_true", help="also read the pool from gs:// on a loopback Cloud Storage emulator"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    hygiene.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cores = hygiene.use_cores(args.threads)  # inherited by every configuration's process
    paths = pool_paths(args.dir, args.size)
    import psutil

    loaders = ["jax_advprune"] + ([] if args.skip_reference else ["reference (torch, in RAM)"])
    pool_bytes = sum(os.path.getsize(p) for p in paths)
    if len(loaders) > 1 and 2 * pool_bytes > 0.8 * psutil.virtual_memory().available:
        print(
            f"reference skipped: it holds the pool twice at peak ({2 * pool_bytes / 2**30:.1f} GiB), more than this machine's free memory",
            flush=True,
        )
        loaders = loaders[:1]
    warm_page_cache(paths)
    sources = {loader: paths for loader in loaders}
    cache_copy = None
    if args.gcs:
        _, bucket = start_emulator()
        loaders.insert(1, "jax_advprune gs://")
        sources["jax_advprune gs://"] = upload(paths, bucket)
        cache_copy = timed_cache_copy(sources["jax_advprune gs://"], args.dir)
    guard = hygiene.IdleGuard(args.allow_busy)  # the emulator is a child: its CPU counts as this benchmark's
    configurations = [(loader, workers) for workers in args.workers for loader in loaders]
    runs = {c: [] for c in configurations}
    for round_index in range(args.repeats):
        for loader, workers in configurations:
            steps = args.steps if loader.startswith("jax_advprune") else max(20, args.steps // 4)
            spec = dict(
                loader=loader,
                paths=sources[loader],
                keep=args.keep,
                batch=args.batch,
                workers=workers,
                steps=steps,
                warmup=5,
                threads=args.threads,
            )
            result = measure(spec)
            runs[(loader, workers)].append(result)
            print(
                f"  round {round_index + 1}: {loader:28s} workers {workers}: {result['images_per_s']:9.0f} img/s, "
                f"{result['cores_busy']:.1f} cores busy, peak PSS {result['peak_pss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    machine_state = guard.finish()
    rows = []
    for (loader, workers), results in runs.items():
        stats = hygiene.summary([r["seconds"] for r in results])
        steps = results[0]["timed_batches"]
        rows.append(
            dict(
                loader=loader,
                workers=workers,
                steps=steps,
                images_per_s=args.batch * steps / stats["median_s"],
                spread=stats["spread"],
                images_per_s_all=[r["images_per_s"] for r in results],
                cores_busy_all=[r["cores_busy"] for r in results],
                peak_pss_bytes=max(r["peak_pss_bytes"] for r in results),
                main_peak_rss_bytes=max(r["main_peak_rss_bytes"] for r in results),
                threads=results[-1]["threads"],
            )
        )
    by = {(r["loader"], r["workers"]): r for r in rows}
    print(
        f"\npool {args.size:,} images ({pool_bytes / 2**30:.1f} GiB on disk), keep {args.keep:.0%}, batch {args.batch}, crop+flip, "
        f"{args.threads} cores; median of {args.repeats} fresh processes per configuration, taking turns; "
        f"other processes used {machine_state['others_cores_mean']:.2f} cores on average\n"
    )
    print(
        "| loader | workers | images/s (spread) | cores busy | peak PSS (GiB) | main peak RSS (GiB) | speed vs reference |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = by.get(("reference (torch, in RAM)", r["workers"]))
        ratio = (
            f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref and r["loader"].startswith("jax_advprune") else ""
        )
        busy = sorted(r["cores_busy_all"])[len(r["cores_busy_all"]) // 2]
        print(
            f"| {r['loader']} | {r['workers']} | {r['images_per_s']:,.0f} ({100 * r['spread']:.0f}%) | {busy:.1f} | {r['peak_pss_bytes'] / 2**30:.2f} "
            f"| {r['main_peak_rss_bytes'] / 2**30:.2f} | {ratio} |"
        )
    if cache_copy:
        print(
            f"\ngs:// rows: every batch's rows fetched as merged byte ranges from a loopback emulator on the same cores. "
            f"data.cache_dir instead copies the parts once per host ({cache_copy['mib_per_s']:.0f} MiB/s here), then reads as the local rows."
        )
    out = hygiene.write_results(
        f"loader_{args.size}{'_gcs' if args.gcs else ''}.json",
        {
            "pool_size": args.size,
            "keep": args.keep,
            "gcs": "loopback emulator (gcp-storage-emulator + tests/gcs_emulator.py, in memory, same cores)"
            if args.gcs
            else None,
            "batch": args.batch,
            "augmentation": "crop 4 + flip",
            "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "cores_used": cores, "platform": platform.platform()},
            "machine_state": machine_state,
            "rows": rows,
            "cache_dir_copy": cache_copy,
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
