"""Every table of figures in README.md and docs/*.md, generated from the JSON the benchmarks write.

A generated table sits between two markers that name its renderer and the files it comes from:

    <!-- table: attacks (benchmarks/results/attacks.json) -->
    | model | batch | ... |
    <!-- end table -->

    python benchmarks/tables.py          # rewrites every marked table from its JSON
    python benchmarks/tables.py --check  # exit status 1, naming each table that differs from its JSON

`tests/test_tables.py` runs the check, so a figure edited by hand, or a JSON re-measured without regenerating
the tables, fails the tests. A renderer takes the loaded JSON files, in the order the marker names them, and
returns the table's lines; figures are formatted here and nowhere else.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [
    REPO,
    os.path.join(REPO, "benchmarks"),
]  # the package and the benchmarks, for the renderers that import them
MARKER = re.compile(r"<!-- table: (?P<name>[\w-]+) \((?P<files>[^)]*)\) -->\n(?P<body>.*?)<!-- end table -->", re.S)


def _rate(value: float) -> str:
    """Images (or items) per second: whole numbers from 100 up, one decimal below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 0.1 else f"{value:.3f}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _pct1(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _median(values: list[float]) -> float:
    """The middle of an odd number of repetitions (the benchmarks' median)."""
    return sorted(values)[len(values) // 2]


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


# --------------------------------------------------------------------------- attacks, training step, convolutions


def _attack_name(attack: str) -> str:
    """'PGD-10 linf' -> 'PGD-10 L-inf', 'DeepFool l2 (all classes)' -> 'DeepFool L2, all classes'."""
    attack = attack.replace(" (all classes)", ", all classes").replace("linf", "L-inf")
    return re.sub(r"\bl2\b", "L2", attack)


def attacks(results: dict) -> list[str]:
    rows = []
    for r in results["rows"]:
        model = r["model"].replace("lax.conv", "`lax.conv`")
        peak = r.get("fraction_of_matmul_peak")
        rows.append(
            [
                model,
                r["batch"],
                _attack_name(r["attack"]),
                f"{_rate(r['ours_img_s'])} ({_pct(r['ours']['spread'])})",
                r["ref"],
                f"{_rate(r['ref_img_s'])} ({_pct(r['reference']['spread'])})",
                f"{r['speedup']:.2f}x",
                "" if peak is None or math.isnan(peak) else _pct(peak),
            ]
        )
    return _table(
        ["model", "batch", "attack", "ours img/s", "reference", "ref img/s", "speedup", "% of matmul FLOP/s"], rows
    )


def autoattack_agreement(result: dict) -> list[str]:
    """Robust accuracy per AutoAttack component and of standard AutoAttack, ours and torchattacks', one pair of rows
    per norm (benchmarks/autoattack_agreement.py)."""
    names = [row["attack"] for row in result["results"][0]["rows"]]
    cpu = f"{result['cpu']['cpu_model']}, {result['cpu']['isa_effective']}"
    head = [f"norm, eps (clean accuracy; {result['samples']} samples; {cpu})", "library"] + [
        f"Square ({result['queries']} queries)" if n == "Square" else "standard AutoAttack" if n == "AutoAttack" else n
        for n in names
    ]
    rows = []
    for r in result["results"]:
        eps = f"{round(r['eps'] * 255)}/255" if r["norm"] == "linf" else f"{r['eps']:g}"
        label = f"{_attack_name(r['norm'])} {eps} ({_pct1(r['clean_accuracy'])})"
        for side, key in (("jax_advprune", "ours"), ("torchattacks", "torchattacks")):
            rows.append([label if side == "jax_advprune" else "", side] + [_pct1(row[key]) for row in r["rows"]])
        rows.append(["", "within noise"] + ["yes" if row["agree_within_noise"] else "**no**" for row in r["rows"]])
    return _table(head, rows)


def train_step(results: dict) -> list[str]:
    rows = [
        [
            r["model"],
            r["batch"],
            f"{r['ours_img_s']:.1f} ({_pct(r['spread']['ours'])})",
            f"{r['ref_img_s']:.1f} ({_pct(r['spread']['ref'])})",
            f"{r['speedup']:.2f}x",
            f"{r['ours_xla_conv_img_s']:.1f} ({_pct(r['spread']['ours_xla_conv'])})",
            f"{r['speedup_xla_conv']:.2f}x",
        ]
        for r in results["rows"]
    ]
    return _table(
        ["model", "batch", "ours img/s", "PyTorch img/s", "speedup", "ours with XLA's convolutions", "speedup"], rows
    )


def conv_layers(*results: dict) -> list[str]:
    """One row per instruction set and convolution: PyTorch's time over ours, summed over the layers."""
    rows = []
    for result in results:
        isa = result["machine"]["isa_effective"]
        for side, label in (("xla", "XLA's convolution"), ("onednn", "our oneDNN custom call")):
            ratio = result["total_ratio"][side]
            rows.append([f"{isa}: {label}"] + [f"{ratio[op]:.2f}x" for op in ("forward", "input_grad", "kernel_grad")])
    layers = len(results[0]["rows"])
    return _table([f"{layers} layers, PyTorch time / ours", "forward", "input gradient", "kernel gradient"], rows)


def convolution_gains(*results: dict) -> list[str]:
    """oneDNN's gain over XLA's convolutions in the train step, per instruction set and model, and the default that
    follows from it (oneDNN where the gain reaches models.layers.MIN_GAIN)."""
    from jax_advprune.models.layers import MIN_GAIN

    rows = []
    for result in results:
        isa = result["machine"]["isa_effective"]
        for r in result["rows"]:
            gain = r["ours_img_s"] / r["ours_xla_conv_img_s"]
            rows.append(
                [
                    isa,
                    f"{r['model']}, batch {r['batch']}",
                    f"{r['ours_img_s']:.1f}",
                    f"{r['ours_xla_conv_img_s']:.1f}",
                    f"{gain:.2f}x",
                    "oneDNN" if gain >= MIN_GAIN else "XLA",
                ]
            )
    head = [
        "host instruction set",
        "model",
        "step img/s, oneDNN convolutions",
        "step img/s, XLA's",
        "oneDNN's gain",
        "default convolutions",
    ]
    return _table(head, rows)


def onednn_check(*results: dict) -> list[str]:
    """Runs of the oneDNN kernel's fuzz test (python -m jax_advprune.kernels.check --out ...)."""
    rows = []
    for result in results:
        runs = result["results"]
        groups = sorted({(r["devices"], r["isa"]) for r in runs})
        failed = sum(r["status"] != "ok" for r in runs)
        reports = sum(r["status"] == "report" for r in runs)
        control = result.get("positive_control")
        sanitizer = (
            f"{reports} (positive control {'reported' if control and control['status'] in ('crash', 'report') else 'missed'} first)"
            if result["checked"]
            else "(plain build)"
        )
        shapes = result.get("shapes", len(runs) // len(groups))
        where = ", ".join(f"{d} device{'s' if d > 1 else ''} x {isa}" for d, isa in groups)
        rows.append(
            [
                f"`{result['command']}`"
                if "command" in result
                else "`python -m jax_advprune.kernels.check"
                + (" --checked`" if result["checked"] else "`")
                + " (the other arguments were not recorded)",
                shapes,
                f"{len(runs):,} ({where})",
                failed,
                sanitizer,
                f"{result['seconds']:,.0f}" if "seconds" in result else "not recorded",
            ]
        )
    return _table(["command", "shapes", "case runs", "failed", "sanitizer reports", "seconds"], rows)


def onednn_overrun(result: dict) -> list[str]:
    """oneDNN's strided 1x1 kernel-gradient scratchpad overrun per setting (python -m jax_advprune.kernels.overrun_probe)."""
    rows = []
    for r in result["settings"]:
        over = r["overruns"]
        if over:
            channels = sorted({o["c"] for o in over})
            strides = sorted({o["stride"] for o in over})
            which = (
                f"{len(over):,} (strides {', '.join(map(str, strides))}; {channels[0]}-{channels[-1]} input channels)"
            )
            sizes = sorted(o["overrun_bytes"] for o in over)
            bytes_past = f"{sizes[0]}-{sizes[-1]}"
        else:
            which, bytes_past = "none", ""
        isa = {"AVX512_CORE": "AVX-512"}.get(r["isa"], r["isa"])
        hung = ", ".join("x".join(map(str, shape)) for shape in r.get("hung", [])) or "none"
        rows.append([f"{isa}, {r['threads']}", f"{r['shapes']:,}", which, bytes_past, hung])
    head = [
        "ISA, OpenMP threads",
        "shapes",
        "shapes written past the scratchpad",
        "bytes past its end",
        "shapes on which it hung (n h w c o stride)",
    ]
    return _table(head, rows)


# --------------------------------------------------------------------------- loader


def _pool(size: int) -> str:
    return f"{size // 1_000_000}M" if size >= 1_000_000 else f"{size // 1000}k"


def _loader_name(loader: str) -> str:
    return {
        "reference (torch, in RAM)": "reference (in RAM, PyTorch)",
        "jax_advprune gs://": "jax_advprune, gs:// (emulator)",
    }.get(loader, loader)


def loader(*results: dict) -> list[str]:
    """Rows of every loader run; a run without repetitions (no spread) is marked as a single earlier run."""
    rows = []
    for result in results:
        repeated = "repeats" in result
        for r in result["rows"]:
            pool = _pool(result["pool_size"]) + ("" if repeated else ", one repetition, before the benchmark rules")
            rate = f"{r['images_per_s']:,.0f}" + (f" ({_pct(r['spread'])})" if repeated else "")
            busy = f"{_median(r['cores_busy_all']):.1f}" if repeated else ""
            rows.append(
                [pool, _loader_name(r["loader"]), r["workers"], rate, busy, f"{r['peak_pss_bytes'] / 2**30:.2f} GiB"]
            )
    return _table(["pool", "loader", "workers", "images/s (spread)", "cores busy", "peak memory"], rows)


def loader_gcs(result: dict) -> list[str]:
    rows = [
        [
            _pool(result["pool_size"]),
            _loader_name(r["loader"]) + (", local disk" if r["loader"] == "jax_advprune" else ""),
            r["workers"],
            f"{r['images_per_s']:,.0f} ({_pct(r['spread'])})",
            f"{_median(r['cores_busy_all']):.1f}",
        ]
        for r in result["rows"]
    ]
    copy = result["cache_dir_copy"]
    rows.append(
        [
            _pool(result["pool_size"]),
            "`data.cache_dir` copy from the emulator, once per host",
            "",
            f"{copy['mib_per_s']:.0f} MiB/s",
            "",
        ]
    )
    return _table(["pool", "loader", "workers", "images/s (spread)", "cores busy"], rows)


# --------------------------------------------------------------------------- scoring at pool scale


def scoring(result: dict) -> list[str]:
    rows = []
    for r in result["rows"]:
        t = r["timing"]
        against = ""
        if "baseline_timing" in r:
            b = r["baseline_timing"]
            against = f"{r['baseline']}: {b['median_s']:.1f} s ({b['best_s']:.1f}, {_pct(b['spread'])}), ours **{r['speed_vs_baseline']:.2f}x**"
            if "identical_to_faiss" in r:
                against += (
                    f"; identical neighbour sets for {100 * r['identical_to_faiss']:.3f}".rstrip("0").rstrip(".")
                    + "% of queries"
                )
            if "median_rel_diff_vs_foolbox" in r:
                against += (
                    f"; distances equal to {100 * r['median_rel_diff_vs_foolbox']:.2f}% (median, {r['distances_compared']} of "
                    f"{r['items']} samples)"
                )
        elif "mean_iterations" in r:
            against = f"({r['mean_iterations']:.1f} iterations on average, {_pct(r['converged'])} converged)"
        hours = r["hours_per_million"]
        rows.append(
            [
                r["stage"],
                f"{r['items']:,}",
                f"{t['median_s']:.1f} ({t['best_s']:.1f}, {_pct(t['spread'])})",
                _rate(r["per_s"]) if r["per_s"] >= 10 else f"{r['per_s']:.3g}",
                f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}",
                against,
            ]
        )
    return _table(
        ["stage", "items", "median s (best, spread)", "items/s", "hours per 1M", "baseline in the same run"], rows
    )


def knn_memory(result: dict) -> list[str]:
    memory = result["knn_memory"]
    rows = [
        [
            f"{r['queries']:,} ({r['embedding_file_bytes'] / 2**30:.2f} GiB file)",
            r["engine"],
            f"{r['per_s']:,.0f}",
            f"{r['rss_anon_before'] / 2**20:.0f} -> {r['rss_anon_peak'] / 2**20:.0f} MiB",
            f"{r['rss_file_peak'] / 2**20:,.0f} MiB",
        ]
        for r in memory["runs"]
    ]
    x = memory["extrapolated_20m"]
    rows.append(
        [
            f"20,000,000 (extrapolated linearly from {', '.join(f'{q:,}' for q in x['from_queries'])}, not measured)",
            "faiss",
            "",
            f"about {x['rss_anon_peak'] / 2**20:.0f} MiB ({x['bytes_per_query']:.1f} B per query)",
            "",
        ]
    )
    return _table(
        ["queries", "engine", "queries/s", "anonymous memory, before -> peak", "file pages mapped, peak"], rows
    )


# --------------------------------------------------------------------------- plan, study, embedded default


def plan_programs(result: dict) -> list[str]:
    from jax_advprune.plan import program_table

    return program_table(result)


def plan_phases(result: dict) -> list[str]:
    from jax_advprune.plan import phase_table

    return phase_table(result)


def plan_summary(*plans: dict) -> list[str]:
    """One row per plan: the topology, the first program's HBM per chip and the plan's total hours."""
    rows = []
    for plan in plans:
        program, total, u = plan["programs"][0], plan["total"], plan["utilisation"]
        rows.append(
            [
                f"{plan['topology']} ({plan['chips']} chips, {plan['hosts']} hosts)",
                f"{program['hbm_bytes'] / 2**30:.2f} GiB",
                f"{total['hours_roofline']:.2f}",
                f"{total['hours_at_utilisation']:.1f} (at {u:.2f})",
                f"{total['chip_hours_at_utilisation']:.0f}",
            ]
        )
    return _table(
        ["topology", "HBM per chip", "hours at roofline", "hours at the utilisation", "chip-hours at the utilisation"],
        rows,
    )


def pruning_study(result: dict) -> list[str]:
    from pruning_study import by_method

    return by_method(result["table"], argparse.Namespace(**result["settings"]))


def study_v3(table: str):
    """The renderer of benchmarks/pruning_study_v3.py's `table` function (its convergence, grid, paired and scoring
    cost tables), imported when a document uses it."""

    def render(result: dict) -> list[str]:
        import pruning_study_v3

        return getattr(pruning_study_v3, table)(result)

    return render


def embedded_default(*results: dict) -> list[str]:
    """The README's runs of the embedded default, one block of rows per CPU the JSON files come from."""
    rows = []
    for result in results:
        machine = result["machine"]
        for run in result["runs"]:
            r = run["results"]
            kept = f"{r['kept']:,}" + (f" ({r['lowered_eps']:,} with lowered eps)" if r.get("lowered_eps") else "")
            host = f"{machine['isa_effective']}, {run['convolutions']} convolutions"
            accuracies = [f"{100 * r[k]:.1f}%" for k in ("clean", "pgd20", "apgd_ce", "apgd_ce_apgd_t")]
            rows.append([f"{run['label']} (`{run['command']}`)", host, kept, *accuracies])
    head = [
        "run (seed 0, 269 test digits, EMA weights)",
        "CPU",
        "kept",
        "clean",
        "PGD-20",
        "APGD-CE",
        "APGD-CE + APGD-T",
    ]
    return _table(head, rows)


def embedded_default_command(*results: dict) -> list[str]:
    """The README's first command (the first run of each file): what it gives on each CPU."""
    rows = []
    for result in results:
        run, machine = result["runs"][0], result["machine"]
        r = run["results"]
        accuracies = [f"{100 * r[k]:.1f}%" for k in ("clean", "pgd20", "apgd_ce", "apgd_ce_apgd_t")]
        rows.append(
            [
                f"{machine['cpu_model']}, {machine['isa_effective']} ({run['convolutions']} convolutions)",
                f"{r['lowered_eps']:,}",
                *accuracies,
            ]
        )
    head = ["CPU", "kept with lowered eps (of 10,700)", "clean", "PGD-20", "APGD-CE", "APGD-CE + APGD-T"]
    return _table(head, rows)


RENDERERS = {
    "attacks": attacks,
    "autoattack_agreement": autoattack_agreement,
    "train_step": train_step,
    "conv_layers": conv_layers,
    "convolution_gains": convolution_gains,
    "onednn_check": onednn_check,
    "onednn_overrun": onednn_overrun,
    "loader": loader,
    "loader_gcs": loader_gcs,
    "scoring": scoring,
    "knn_memory": knn_memory,
    "plan_programs": plan_programs,
    "plan_phases": plan_phases,
    "plan_summary": plan_summary,
    "pruning_study": pruning_study,
    "study_v3_convergence": study_v3("convergence_table"),
    "study_v3_grid": study_v3("grid_table"),
    "study_v3_paired": study_v3("paired_table"),
    "study_v3_scoring_cost": study_v3("scoring_cost_table"),
    "embedded_default": embedded_default,
    "embedded_default_command": embedded_default_command,
}


# --------------------------------------------------------------------------- the documents


def documents() -> list[str]:
    return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def render(name: str, files: list[str]) -> str:
    if name not in RENDERERS:
        raise ValueError(f"unknown table {name!r}; known: {sorted(RENDERERS)}")
    loaded = []
    for path in files:
        with open(os.path.join(REPO, path)) as f:
            loaded.append(json.load(f))
    return "\n".join(RENDERERS[name](*loaded)) + "\n"


def regenerate(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table rendered from its JSON -> (new text, names of the tables that changed)."""
    changed = []

    def one(match: re.Match) -> str:
        files = [f.strip() for f in match.group("files").split(",") if f.strip()]
        body = render(match.group("name"), files)
        if body != match.group("body"):
            changed.append(f"{match.group('name')} ({', '.join(files)})")
        return f"<!-- table: {match.group('name')} ({match.group('files')}) -->\n{body}<!-- end table -->"

    return MARKER.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 when a table differs from its JSON"
    )
    args = parser.parse_args(argv)
    stale, count = [], 0
    for path in documents():
        with open(path) as f:
            text = f.read()
        new, changed = regenerate(text)
        count += len(MARKER.findall(text))
        stale += [f"{os.path.relpath(path, REPO)}: {c}" for c in changed]
        if changed and not args.check:
            with open(path, "w") as f:
                f.write(new)
    if args.check and stale:
        print(
            "tables that differ from their JSON (run python benchmarks/tables.py):\n  " + "\n  ".join(stale),
            file=sys.stderr,
        )
        return 1
    print(f"{count} generated tables, {len(stale)} {'stale' if args.check else 'rewritten'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
