"""The README's runs of the embedded default, re-measured: PUMA (the README's first command), random pruning at
the same keep ratio, and the full pool, each in a fresh work directory, one after the other.

    python benchmarks/embedded_default.py [--isa AVX2] [--allow-busy]

Writes benchmarks/results/embedded_default[_avx2].json: for each run its command, the accuracies of the EMA
weights on the 269 test digits (clean, PGD-20, APGD-CE, APGD-CE + APGD-T), the kept and lowered-eps counts, the
wall seconds per phase, the CPU (model, AVX-512 or AVX2, the cap), which convolution ran (oneDNN or XLA) and the
code's commit. `python benchmarks/tables.py` then regenerates the README's table from it. The accuracies do not
depend on the machine's load; the seconds do, so the run refuses a busy machine like every benchmark here.
With `--isa AVX2` every library is capped at AVX2 (what an AVX2-only host runs: XLA's convolutions, since the
oneDNN kernel is not the default there), which answers whether the figures depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hygiene  # noqa: E402

RUNS = [
    ("PUMA, keep 0.5", []),
    ("random, keep 0.5", ["--config.pruning.strategy=random"]),
    ("full pool", ["--config.pruning.strategy=random", "--config.pruning.keep_ratio=1.0"]),
]
ACCURACIES = {
    "clean": "clean_accuracy",
    "pgd20": "pgd_accuracy",
    "apgd_ce": "apgd_ce_accuracy",
    "apgd_ce_apgd_t": "autoattack_lite_accuracy",
}


def run_once(label: str, overrides: list[str], workdir: str, env: dict) -> dict:
    """One run of configs/default.py with `overrides` in a fresh `workdir` -> its record."""
    command = " ".join(
        ["python -m jax_advprune.main --config configs/default.py --workdir runs/default"] + overrides
    )  # as the README gives it
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jax_advprune.main", "--config", "configs/default.py", "--workdir", workdir] + overrides,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"{label}: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "selection", "meta.json")) as f:
        selection = json.load(f)
    with open(
        os.path.join(workdir, "run.log")
    ) as f:  # the run's choice: "convolutions: oneDNN custom call ..." or "XLA (...)"
        chosen = next(
            (line.split(" convolutions: ", 1)[1].strip() for line in f if " convolutions: " in line), "unknown"
        )
    ema = results["results"]["ema"]
    return {
        "label": label,
        "command": command,
        "results": {key: ema[name] for key, name in ACCURACIES.items()}
        | {"kept": results["kept"], "lowered_eps": selection.get("lowered_eps", 0)},
        "standard_errors": {key: ema[name + "_se"] for key, name in ACCURACIES.items()},
        "wall_seconds": time.perf_counter() - started,
        "phase_seconds": results["wall_seconds"],
        "convolutions": "oneDNN" if chosen.startswith("oneDNN") else "XLA",
        "convolutions_log": chosen,
        "code": results["code"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    hygiene.add_arguments(parser)
    hygiene.add_isa_argument(parser)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.isa != "native":
        env.update(
            ONEDNN_MAX_CPU_ISA=args.isa,
            ATEN_CPU_CAPABILITY=args.isa.lower(),
            XLA_FLAGS=(env.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={args.isa}").strip(),
        )
    guard = hygiene.IdleGuard(args.allow_busy)
    scratch = tempfile.mkdtemp(prefix="jax_advprune_default_")
    runs = []
    try:
        for index, (label, overrides) in enumerate(RUNS):
            runs.append(run_once(label, overrides, os.path.join(scratch, str(index)), env))
            r = runs[-1]["results"]
            print(
                f"{label}: clean {100 * r['clean']:.1f}%, PGD-20 {100 * r['pgd20']:.1f}%, APGD-CE {100 * r['apgd_ce']:.1f}%, "
                f"APGD-CE + APGD-T {100 * r['apgd_ce_apgd_t']:.1f}%; kept {r['kept']:,} ({r['lowered_eps']:,} with lowered eps); "
                f"{runs[-1]['wall_seconds']:.0f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine_state = guard.finish()
    out = hygiene.write_results(
        hygiene.results_name("embedded_default", args.isa),
        {
            "machine": {"cpus": os.cpu_count(), **hygiene.cpu_record(args.isa)},
            "machine_state": machine_state,
            "runs": runs,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
