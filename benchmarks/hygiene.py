"""What every benchmark here does so that its figures come back when re-run.

1. Cores and threads, set and verified. `use_cores(n)` confines the process to n
   cores before JAX is imported (XLA:CPU sizes its thread pool to the cores it may
   use); `check_cores`, `torch_threads`, `faiss_threads` and `blas_threads` set a
   library's threads and read them back right before a side is timed, returning
   the record that goes into the JSON. Every timed call also records the CPU
   seconds the benchmark's processes spent per wall second (`cores_busy`): the
   threads that actually worked.
2. Repetitions with their spread. `take_turns` runs the sides in turn, at least 3
   rounds, so that drift of the machine hits every side alike; `summary` gives the
   median, the best and the spread ((max - min) / median) of each side.
3. An idle machine. `IdleGuard` measures the CPU time that processes outside this
   benchmark spend (from /proc/stat, steal time of a virtual machine included) for
   3 s before the benchmark starts and every second while it runs. The load average
   would lag by minutes and count the benchmark's own threads, so it is recorded
   but not the criterion. With more than `BUSY_CORES` cores of other work (before,
   or on average during the run) the benchmark refuses to write its results unless
   --allow-busy is given, which is recorded with the figures. A single-threaded
   matmul timed at the start and the end (`calibration`) records the machine's
   speed, to compare runs on different machines.

Nothing here imports JAX, so `use_cores` can run before it is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

BUSY_CORES = 0.15  # mean CPU use by other processes, in cores, above which the machine is busy
MIN_REPEATS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--allow-busy and --repeats (at least MIN_REPEATS) for a benchmark's command line."""
    parser.add_argument(
        "--allow-busy",
        action="store_true",
        help="write results even when other work ran on the machine (recorded in the JSON)",
    )
    parser.add_argument(
        "--repeats",
        type=_repeats,
        default=MIN_REPEATS,
        help=f"timed repetitions of every figure (at least {MIN_REPEATS}; median reported)",
    )


# ---------------------------------------------------------------- instruction set

ISA_CAPS = ("native", "AVX2")


def add_isa_argument(parser: argparse.ArgumentParser) -> None:
    """--isa for a benchmark that applies `cap_isa` before importing the libraries it times."""
    parser.add_argument(
        "--isa",
        choices=ISA_CAPS,
        default="native",
        help="cap every side's instruction set (see cap_isa): AVX2 runs an AVX-512 host's code paths as an AVX2 host's",
    )


def cap_isa(isa: str) -> None:
    """Caps the instruction set of every library a benchmark times, before any of them is imported: oneDNN (ours and
    PyTorch's, ONEDNN_MAX_CPU_ISA), PyTorch's own kernels (ATEN_CPU_CAPABILITY) and the code XLA:CPU generates
    (--xla_cpu_max_isa). What is compiled ahead of time into jaxlib (Eigen's convolutions and matmuls) runs as it does
    on any host; so does it on a real AVX2 host. 'native' changes nothing."""
    if isa == "native":
        return
    os.environ["ONEDNN_MAX_CPU_ISA"] = isa
    os.environ["ATEN_CPU_CAPABILITY"] = isa.lower()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={isa}").strip()


def cpu_record(isa: str) -> dict:
    """The CPU a figure comes from: model name, whether it has AVX-512 and AVX2, and the cap the run set."""
    from jax_advprune.cpu import cpu_info

    model, flags = cpu_info()
    return {
        "cpu_model": model,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "isa_cap": isa,
        "isa_effective": "AVX-512"
        if "avx512f" in flags and isa == "native"
        else "AVX2"
        if "avx2" in flags
        else "below AVX2",
    }


def results_name(stem: str, isa: str) -> str:
    """benchmarks/results file name of a run: <stem>.json, or <stem>_<isa>.json under an ISA cap."""
    return f"{stem}.json" if isa == "native" else f"{stem}_{isa.lower()}.json"


def machine_record(cores_used: list[int], **extra) -> dict:
    """What a results file says of the machine: platform, CPU count, the cores the benchmark kept itself to, the jax
    version, and `extra` (library versions, devices, threads)."""
    import platform

    import jax

    return dict(platform=platform.platform(), cpus=os.cpu_count(), cores_used=cores_used, jax=jax.__version__, **extra)


def write_results(name: str, record: dict) -> str:
    """Writes `record` as benchmarks/results/<name> (indented JSON) -> its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def _repeats(text: str) -> int:
    value = int(text)
    if value < MIN_REPEATS:
        raise argparse.ArgumentTypeError(f"at least {MIN_REPEATS} repetitions, got {value}")
    return value


# ---------------------------------------------------------------- cores and threads


def use_cores(n: int) -> list[int]:
    """Confines every thread of this process (and what it starts later) to the first n usable cores -> those cores.

    Call before importing JAX: XLA:CPU sizes its thread pool to the usable cores."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(allowed):
        raise SystemExit(f"--threads must be between 1 and the {len(allowed)} usable cores, got {n}")
    cores = allowed[:n]
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except (ProcessLookupError, PermissionError):
            pass
    return cores


def check_cores(n: int) -> dict:
    """Raises unless every thread of this process may use exactly n cores -> {'cores': n}."""
    for task in os.listdir("/proc/self/task"):
        try:
            usable = len(os.sched_getaffinity(int(task)))
        except ProcessLookupError:
            continue
        if usable != n:
            raise RuntimeError(f"thread {task} of this process may use {usable} cores, the benchmark set {n}")
    return {"cores": n}


def xla_threads(n: int) -> dict:
    """Checks the cores the XLA:CPU thread pool runs on -> {'cores', 'xla_cpu_devices'} (JAX imported)."""
    import jax

    return check_cores(n) | {"xla_cpu_devices": jax.local_device_count()}


def torch_threads(n: int) -> dict:
    """Sets PyTorch's intra-op threads to n and reads them back (JAX work in the same process can leave
    PyTorch's OpenMP at one thread) -> {'torch_threads': n, 'cores': n}."""
    import torch

    torch.set_num_threads(n)
    if torch.get_num_threads() != n:
        raise RuntimeError(f"PyTorch runs {torch.get_num_threads()} threads, the benchmark set {n}")
    return check_cores(n) | {"torch_threads": n}


def faiss_threads(n: int) -> dict:
    """Sets faiss's OpenMP threads to n and reads them back -> {'faiss_threads': n, 'cores': n}."""
    import faiss

    faiss.omp_set_num_threads(n)
    if faiss.omp_get_max_threads() != n:
        raise RuntimeError(f"faiss runs {faiss.omp_get_max_threads()} threads, the benchmark set {n}")
    return check_cores(n) | {"faiss_threads": n}


def blas_threads(n: int) -> dict:
    """Limits NumPy's BLAS/OpenMP pools to n threads (threadpoolctl) and reads them back -> {'blas_threads': n}."""
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(n)
    counts = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}
    if any(c > n for c in counts.values()):
        raise RuntimeError(f"thread pools run {counts}, the benchmark set {n}")
    return {"blas_threads": n}


# ---------------------------------------------------------------- CPU time accounting


def tree_cpu_seconds() -> float:
    """CPU seconds spent so far by this process, its live descendants and its reaped children."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _Counters:
    def __init__(self):
        self.wall, self.busy, self.tree = time.perf_counter(), _machine_busy_seconds(), tree_cpu_seconds()

    def others_cores(self, since: _Counters) -> float:
        """Mean cores used by processes outside this benchmark between `since` and this sample."""
        wall = self.wall - since.wall
        return max((self.busy - since.busy) - (self.tree - since.tree), 0.0) / wall if wall > 0 else 0.0


def calibration(size: int = 512, repeats: int = 5) -> float:
    """GFLOP/s of a single-threaded NumPy float32 matmul (best of `repeats`): the machine's speed."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((size, size), np.float32)
    best = float("inf")
    with threadpool_limits(1):
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class IdleGuard:
    """Watches other work on the machine from before the benchmark starts until it writes its results.

    guard = IdleGuard(args.allow_busy)   # measures 3 s, refuses to start on a busy machine
    ...                                   # the benchmark
    record = guard.finish()              # refuses (SystemExit) if others ran; the record for the JSON
    """

    def __init__(self, allow_busy: bool, *, settle_s: float = 3.0, every_s: float = 1.0):
        self.allow_busy = allow_busy
        self.load_average_start = os.getloadavg()
        before = _Counters()
        time.sleep(settle_s)
        self._last = _Counters()
        self.others_at_start = self._last.others_cores(before)
        self.calibration_start = calibration()
        if self.others_at_start > BUSY_CORES:
            message = (
                f"the machine is busy: other processes used {self.others_at_start:.2f} cores over the last {settle_s:.0f} s "
                f"(load average {self.load_average_start[0]:.2f}); timings taken now would not come back when re-run"
            )
            if not allow_busy:
                raise SystemExit(
                    f"{message}. Wait for the other work to end, or pass --allow-busy (recorded with the results)."
                )
            print(f"warning: {message}; going on (--allow-busy)", flush=True)
        self._start = self._last
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            now = _Counters()
            self.samples.append(now.others_cores(self._last))
            self._last = now

    def finish(self) -> dict:
        """Stops watching -> the record for the results JSON; SystemExit if other work ran and --allow-busy is not set."""
        self._stop.set()
        self._thread.join()
        others_mean = _Counters().others_cores(self._start)
        record = dict(
            allow_busy=self.allow_busy,
            busy_threshold_cores=BUSY_CORES,
            others_cores_at_start=round(self.others_at_start, 3),
            others_cores_mean=round(others_mean, 3),
            others_cores_max_1s=round(max(self.samples, default=0.0), 3),
            seconds_watched=len(self.samples),
            load_average_start=self.load_average_start,
            load_average_end=os.getloadavg(),
            calibration_gflop_s=dict(start=round(self.calibration_start, 2), end=round(calibration(), 2)),
        )
        record["busy"] = others_mean > BUSY_CORES or self.others_at_start > BUSY_CORES
        if record["busy"] and not self.allow_busy:
            raise SystemExit(
                f"not writing results: other processes used {others_mean:.2f} cores on average while the benchmark ran "
                f"(at most {record['others_cores_max_1s']:.2f} in one second). Re-run on an idle machine, or pass --allow-busy."
            )
        return record


# ---------------------------------------------------------------- repetitions


def summary(seconds: list[float]) -> dict:
    """{'median_s', 'best_s', 'spread', 'repeats'} of repeated wall times; spread = (max - min) / median."""
    ordered = sorted(seconds)
    median = (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    )
    return dict(
        median_s=median,
        best_s=ordered[0],
        spread=(ordered[-1] - ordered[0]) / median if median else 0.0,
        repeats=len(ordered),
    )


def take_turns(
    sides: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    threads: dict[str, Callable[[], dict]],
    block: Callable[[Any], Any] = lambda out: out,
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Times every side once per round, the sides in turn, for `repeats` rounds.

    sides: name -> call to time (warmed up already). threads: name -> sets and checks
    that side's threads right before each timed call, returning its record. block:
    waits for a call's output (e.g. jax.block_until_ready). Returns ({name: summary +
    'seconds_all', 'cores_busy_all', 'threads'}, {name: the last call's output}).
    """
    seconds = {name: [] for name in sides}
    cores = {name: [] for name in sides}
    records, outputs = {}, {}
    for _ in range(repeats):
        for name, call in sides.items():
            records[name] = threads[name]()
            before_cpu, start = tree_cpu_seconds(), time.perf_counter()
            outputs[name] = block(call())
            wall = time.perf_counter() - start
            seconds[name].append(wall)
            cores[name].append(round((tree_cpu_seconds() - before_cpu) / wall, 2))
    stats = {
        name: summary(seconds[name])
        | dict(seconds_all=seconds[name], cores_busy_all=cores[name], threads=records[name])
        for name in sides
    }
    return stats, outputs


def timed(
    call: Callable[[], Any], *, repeats: int, threads: Callable[[], dict], block: Callable[[Any], Any] = lambda out: out
) -> tuple[dict, Any]:
    """`take_turns` with one side: (its stats, its last output)."""
    stats, outputs = take_turns({"side": call}, repeats=repeats, threads={"side": threads}, block=block)
    return stats["side"], outputs["side"]


def describe(stats: dict) -> str:
    """'median 1.23 s (best 1.20, spread 4%, 3 runs, 1.9 cores busy)' for tables."""
    busy = stats.get("cores_busy_all") or [0.0]
    return (
        f"median {stats['median_s']:.3g} s (best {stats['best_s']:.3g}, spread {100 * stats['spread']:.0f}%, "
        f"{stats['repeats']} runs, {sorted(busy)[len(busy) // 2]:.1f} cores busy)"
    )
