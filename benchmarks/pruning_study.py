"""Study v2: every strategy x keep ratio x class balance x seed in the papers' setting, with its measured compute,
against compute-matched baselines. One table, one JSON, one plot.

    pip install -e ".[bench]"
    python benchmarks/pruning_study.py [--seeds 0 1 2] [--ratios 0.75 0.5 0.25] [--epochs 10] [--workdir runs/study_v2]

Runs, in this process, configs/default.py (digits: 1,528 originals + 20,000
generated images) in the papers' setting: pruning.scope='synthetic' (the
originals are always kept), batches of 30% originals / 70% generated, an epoch
of ceil(originals / batch) steps whatever the pool holds, --epochs for the
scoring and the final models, PGD-20 evaluation. For each seed (data order,
initialisation, scoring models; not the data), with class_balanced off and on:

  random                      uniform random subset
  prune_easy / prune_hard     drop the highest / lowest DeepFool L-inf margins
  puma                        prune_easy + eps lowered to the margin below eps
  keep_top du (extrapolated)  Nieth et al.'s protocol: DU (window 5) of a history recorded
                              once per pass in a run on a 1,000-image synthetic subset
                              alone, kNN-extrapolated (k = 12) to the pool
  keep_top el2n               keep the highest EL2N (2 scoring models)
  keep_bottom el2n            keep the lowest EL2N (the easy samples)

at each keep ratio, plus the full pool. Each score is computed once per seed and
shared by the runs that rank it, but every run is charged its whole cost:
compute = score + select + train seconds (the evaluation is the same for all and
left out), and device-seconds = compute x the devices of the mesh.

Compute-matched baselines, per seed and per score: the full pool and random
pruning (each keep ratio, not class-balanced) trained for as many epochs as the
mean compute of that score's runs buys. The epochs come from a line through the
full-pool runs' (epochs, train seconds) so far; the compute each baseline then
measured is recorded beside the target.

Every run is a normal work directory under --workdir (rerunning skips finished
runs and reuses their measured seconds). Writes benchmarks/results/pruning_study.
{json,md,png}: clean and PGD-20 accuracy of the EMA weights on the 269 test
digits, mean and spread (min..max) over seeds, and compute in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hygiene  # noqa: E402

DU_SCORING = {"history_protocol": "reference", "extrapolation": {"enabled": True, "subset_size": 1000}}
# (label, strategy, score, extra overrides of config.scoring)
METHODS = [
    ("random", "random", None, {}),
    ("prune_easy", "prune_easy", "margin", {}),
    ("prune_hard", "prune_hard", "margin", {}),
    ("puma", "puma", "margin", {}),
    ("keep_top du (extrapolated)", "keep_top", "du", DU_SCORING),
    ("keep_top el2n", "keep_top", "el2n", {}),
    ("keep_bottom el2n", "keep_bottom", "el2n", {}),
]
SCORES = {"margin": {}, "du": DU_SCORING, "el2n": {}}


def _read_json(path: str) -> dict:
    """The JSON at `path`, or {} where the run has no such file (no score phase, no selection)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def study_config(
    strategy: str,
    score: str | None,
    scoring: dict,
    keep_ratio: float,
    seed: int,
    epochs: float,
    balanced: bool,
    train_epochs: float | None = None,
):
    """configs/default.py in the study's setting; `train_epochs` (default `epochs`) for the final model only."""
    from configs import default

    c = default.get_config()
    c.seed = seed
    c.train.epochs = epochs if train_epochs is None else train_epochs
    c.scoring.train_epochs = epochs
    c.scoring.du_window = 5
    c.eval.attack = "pgd"
    c.pruning.strategy = strategy
    c.pruning.keep_ratio = keep_ratio
    c.pruning.scope = "synthetic"
    c.pruning.class_balanced = balanced
    if score is not None:
        c.scoring.score = score
    if score == "du":
        c.scoring.du_window = min(c.scoring.du_window, int(epochs))  # DU needs as many records as its window
    for key, value in scoring.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                c.scoring[key][sub] = v
        else:
            c.scoring[key] = value
    return c


def share_scores(source: str, target: str) -> None:
    """Copies a finished score phase (scores/, data/, settings/score.json) into a new run directory."""
    os.makedirs(os.path.join(target, "settings"), exist_ok=True)
    for name in ("scores", "data"):
        if os.path.exists(os.path.join(source, name)) and not os.path.exists(os.path.join(target, name)):
            shutil.copytree(os.path.join(source, name), os.path.join(target, name))
    settings = os.path.join(source, "settings", "score.json")
    if os.path.exists(settings) and not os.path.exists(os.path.join(target, "settings", "score.json")):
        shutil.copy(settings, os.path.join(target, "settings", "score.json"))


def matched_epochs(points: list[tuple[float, float]], target_seconds: float) -> float:
    """Epochs whose train phase should take `target_seconds`, from (epochs, train seconds) points of full-pool runs:
    a least-squares line a + b * epochs through them (through the origin with one distinct epoch count)."""
    import numpy as np

    epochs, seconds = np.array(points, float).T
    if len(set(epochs)) < 2:
        return float(target_seconds / np.mean(seconds / epochs))
    b, a = np.polyfit(epochs, seconds, 1)
    return float(max((target_seconds - a) / b, 0.5))


class Study:
    """Runs (or reuses) the study's work directories and collects one row per run."""

    def __init__(self, args, guard: hygiene.IdleGuard):
        from jax_advprune import parallel

        self.args, self.guard, self.rows = args, guard, []
        self.mesh = parallel.make_mesh(None)
        self.start = time.perf_counter()

    def score_seconds(self, seed: int, score: str) -> float:
        """Computes (once) the score phase of `score` at `seed` -> its measured seconds."""
        from jax_advprune import run_dir
        from jax_advprune.data.splits import load_data
        from jax_advprune.phases import score as score_phase

        source = os.path.join(self.args.workdir, f"seed{seed}", f"scores_{score}")
        timing = os.path.join(source, "score_seconds.json")
        if not os.path.exists(timing):
            shutil.rmtree(
                source, ignore_errors=True
            )  # an interrupted score phase restarts clean: its seconds must be whole
            os.makedirs(source)
            config = study_config(
                "keep_top" if score != "margin" else "puma", score, SCORES[score], 0.5, seed, self.args.epochs, False
            )
            begin = time.perf_counter()
            score_phase.run(config, source, load_data(config, run_dir.data_dir(source)), self.mesh)
            with open(timing, "w") as f:
                json.dump({"seconds": time.perf_counter() - begin}, f)
        return json.load(open(timing))["seconds"]

    def run(self, name: str, label: str, config, *, score: str | None, kind: str, **extra) -> dict:
        """One work directory -> its row (accuracies, compute); finished directories are read, not rerun."""
        from jax_advprune.main import run

        workdir = os.path.join(self.args.workdir, name)
        score_s = 0.0
        if score is not None:
            score_s = self.score_seconds(config.seed, score)
            share_scores(os.path.join(self.args.workdir, f"seed{config.seed}", f"scores_{score}"), workdir)
        samples_before = len(self.guard.samples)
        if not os.path.exists(os.path.join(workdir, "results.json")):
            run(config, workdir)
        others = self.guard.samples[samples_before:]
        results = json.load(open(os.path.join(workdir, "results.json")))
        timings = json.load(open(os.path.join(workdir, "timings.json")))
        ema = results["results"]["ema"]
        compute = score_s + timings.get("select", 0.0) + timings["train"]
        scored = _read_json(os.path.join(workdir, "scores", "meta.json"))
        selected = _read_json(os.path.join(workdir, "selection", "meta.json"))
        row = dict(
            method=label,
            kind=kind,
            score=score,
            keep_ratio=config.pruning.keep_ratio,
            class_balanced=bool(config.pruning.class_balanced),
            seed=config.seed,
            epochs=config.train.epochs,
            kept=results["kept"],
            clean=ema["clean_accuracy"],
            pgd=ema["pgd_accuracy"],
            score_s=round(score_s, 2),
            select_s=timings.get("select", 0.0),
            train_s=timings["train"],
            compute_s=round(compute, 2),
            device_s=round(compute * self.mesh.size, 2),
            devices=self.mesh.size,
            others_cores=round(sum(others) / len(others), 3) if others else None,
            # what the docs quote about the scores and the selection, kept beside the accuracies
            spearman_held_out=scored.get("extrapolation", {}).get("spearman_held_out"),
            scoring_fraction_correct=scored.get("fraction_correct"),
            kept_per_class=selected.get("kept_per_class"),
            **extra,
        )
        self.rows.append(row)
        print(
            f"== {name}: clean {row['clean']:.4f} PGD-20 {row['pgd']:.4f} compute {compute:.1f}s "
            f"({(time.perf_counter() - self.start) / 60:.1f} min)",
            flush=True,
        )
        return row

    def warm_up(self) -> None:
        """Compiles, unmeasured, what every measured run uses (train step, validation, scoring passes, DeepFool), so
        that no run pays the process's first compilations: a 1-epoch full-pool run and each score at 2 epochs."""
        from jax_advprune import run_dir
        from jax_advprune.data.splits import load_data
        from jax_advprune.main import run
        from jax_advprune.phases import score as score_phase

        workdir = os.path.join(self.args.workdir, "warm_up")
        shutil.rmtree(workdir, ignore_errors=True)
        run(study_config("random", None, {}, 1.0, 0, 1.0, False), os.path.join(workdir, "full_pool"))
        for score, scoring in SCORES.items():
            config = study_config("keep_top", score, scoring, 0.5, 0, 2.0, False)
            score_phase.run(
                config,
                os.path.join(workdir, score),
                load_data(config, run_dir.data_dir(os.path.join(workdir, score))),
                self.mesh,
            )
        shutil.rmtree(workdir)

    def seed(self, seed: int) -> None:
        args = self.args
        full = self.run(
            f"seed{seed}/full_pool",
            "full pool",
            study_config("random", None, {}, 1.0, seed, args.epochs, False),
            score=None,
            kind="full",
        )
        for balanced in (False, True):
            for ratio in args.ratios:
                for label, strategy, score, scoring in METHODS:
                    slug = label.replace(" ", "_").replace("(", "").replace(")", "")
                    name = f"seed{seed}/{'balanced' if balanced else 'plain'}/{slug}_keep{ratio}"
                    self.run(
                        name,
                        label,
                        study_config(strategy, score, scoring, ratio, seed, args.epochs, balanced),
                        score=score,
                        kind="pruned",
                    )
        points = [(full["epochs"], full["train_s"])]
        for score in SCORES:
            runs = [r for r in self.rows if r["seed"] == seed and r["kind"] == "pruned" and r["score"] == score]
            target = sum(r["compute_s"] for r in runs) / len(runs)
            epochs = round(matched_epochs(points, target), 2)
            for ratio in (1.0, *args.ratios):
                label = f"{'full pool' if ratio == 1.0 else 'random'} (compute of {score} runs)"
                config = study_config("random", None, {}, ratio, seed, args.epochs, False, train_epochs=epochs)
                row = self.run(
                    f"seed{seed}/matched_{score}/random_keep{ratio}",
                    label,
                    config,
                    score=None,
                    kind="matched",
                    matched_to=score,
                    target_compute_s=round(target, 2),
                )
                row["compute_vs_target"] = round(row["compute_s"] / target, 3)
                if ratio == 1.0:
                    points.append((epochs, row["train_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "study_v2"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table and plot from benchmarks/results/pruning_study.json without running anything",
    )
    hygiene.add_arguments(parser)
    args = parser.parse_args()
    if args.report_only:
        saved = json.load(open(os.path.join(REPO, "benchmarks", "results", "pruning_study.json")))
        write_outputs(saved["runs"], argparse.Namespace(**saved["settings"]), saved["machine"])
        return

    guard = hygiene.IdleGuard(args.allow_busy)
    from jax_advprune import parallel
    from jax_advprune.main import setup_logging

    setup_logging()
    parallel.use_cpu_devices()
    study = Study(args, guard)
    study.warm_up()
    for seed in args.seeds:
        study.seed(seed)
    machine = guard.finish() | {"cores": len(os.sched_getaffinity(0))}
    write_outputs(study.rows, args, machine)


def _spread(values) -> tuple[float, float, float]:
    import numpy as np

    values = np.asarray(values, float)
    return float(values.mean()), float(values.min()), float(values.max())


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (method, class balance, keep ratio, matched score) over seeds: means, min..max, compute."""
    keys = list(dict.fromkeys((r["method"], r["class_balanced"], r["keep_ratio"], r.get("matched_to")) for r in rows))
    table = []
    for method, balanced, ratio, matched in keys:
        sel = [
            r
            for r in rows
            if (r["method"], r["class_balanced"], r["keep_ratio"], r.get("matched_to"))
            == (method, balanced, ratio, matched)
        ]
        line = dict(
            method=method,
            kind=sel[0]["kind"],
            class_balanced=balanced,
            keep_ratio=ratio,
            matched_to=matched,
            seeds=len(sel),
            kept=int(round(sum(r["kept"] for r in sel) / len(sel))),
            epochs=round(sum(r["epochs"] for r in sel) / len(sel), 2),
        )
        for metric in ("clean", "pgd", "compute_s", "device_s"):
            line[f"{metric}_mean"], line[f"{metric}_min"], line[f"{metric}_max"] = _spread([r[metric] for r in sel])
        if matched:
            line["compute_vs_target_mean"] = round(sum(r["compute_vs_target"] for r in sel) / len(sel), 3)
        table.append(line)
    return table


def write_outputs(rows: list[dict], args, machine: dict) -> None:
    table = summarise(rows)
    full = next(t for t in table if t["kind"] == "full")
    pct = lambda t, m: f"{100 * t[m + '_mean']:.1f} ({100 * t[m + '_min']:.1f}..{100 * t[m + '_max']:.1f})"  # noqa: E731
    lines = [
        "Embedded default (digits, 1,528 originals + 20,000 generated; 128 originals held out for validation), pruning.scope='synthetic',",
        f"{args.epochs:g} epochs (of 12 steps) for the scoring and the final models, seeds {args.seeds}; EMA weights on the 269 test images,",
        "L-inf eps 0.05, PGD-20. Mean (min..max over seeds). Compute = score + select + train seconds on this machine",
        f"({machine.get('cores', '?')} CPU cores, {rows[0]['devices']} XLA devices; device-seconds = compute x devices), "
        "relative to the full pool's.",
        "",
        "| method | class-balanced | keep | kept | epochs | clean | PGD-20 | compute (s) | vs full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in table:
        balanced = ("yes" if t["class_balanced"] else "no") if t["kind"] == "pruned" else "-"
        lines.append(
            f"| {t['method']} | {balanced} | {t['keep_ratio']:g} | {t['kept']:,} | {t['epochs']:g} "
            f"| {pct(t, 'clean')} | {pct(t, 'pgd')} | {t['compute_s_mean']:.0f} | {t['compute_s_mean'] / full['compute_s_mean']:.2f}x |"
        )
    lines += [
        "",
        "By method: PGD-20 accuracy, mean over seeds, at each keep ratio; compute relative to the full pool's.",
        "",
    ] + by_method(table, args)
    out_dir = os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pruning_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "pruning_study.json"), "w") as f:
        json.dump({"settings": vars(args), "machine": machine, "runs": rows, "table": table}, f, indent=2)
    print("\n".join(lines))
    plot(table, args, os.path.join(out_dir, "pruning_study.png"))
    print(f"wrote {out_dir}/pruning_study.{{md,json,png}}")


def by_method(table: list[dict], args) -> list[str]:
    """A compact table: one line per method (and per matched baseline), PGD-20 at each keep ratio, class balance off
    and on, and the mean compute relative to the full pool."""
    full = next(t for t in table if t["kind"] == "full")
    ratios = sorted(args.ratios, reverse=True)
    head = " / ".join(f"{r:g}" for r in ratios)
    lines = [
        f"| method | compute vs full | PGD-20 at keep {head}, not balanced | class-balanced |",
        "| --- | --- | --- | --- |",
    ]
    cell = lambda rows: " / ".join(f"{100 * r['pgd_mean']:.1f}" if r else "-" for r in rows)  # noqa: E731
    lines.append(f"| full pool | 1.00x | {100 * full['pgd_mean']:.1f} (keep 1) | |")
    for label in [m[0] for m in METHODS]:
        rows = [t for t in table if t["kind"] == "pruned" and t["method"] == label]

        def find(balanced, ratio, rows=rows):
            return next((t for t in rows if t["class_balanced"] == balanced and t["keep_ratio"] == ratio), None)

        compute = sum(t["compute_s_mean"] for t in rows) / len(rows) / full["compute_s_mean"]
        lines.append(
            f"| {label} | {compute:.2f}x | {cell([find(False, r) for r in ratios])} | {cell([find(True, r) for r in ratios])} |"
        )
    for score in SCORES:
        rows = [t for t in table if t["kind"] == "matched" and t["matched_to"] == score]
        if not rows:
            continue
        whole = next((t for t in rows if t["keep_ratio"] == 1.0), None)
        compute = sum(t["compute_s_mean"] for t in rows) / len(rows) / full["compute_s_mean"]
        random_cells = cell([next((t for t in rows if t["keep_ratio"] == r), None) for r in ratios])
        lines.append(
            f"| full pool; random, {rows[0]['epochs']:.0f} epochs (compute of the {score} runs) | {compute:.2f}x "
            f"| full {100 * whole['pgd_mean']:.1f}; random {random_cells} | |"
        )
    return lines


def plot(table: list[dict], args, path: str) -> None:
    """Robust accuracy against compute: one point per method, class balance and keep ratio (mean over seeds,
    min..max bars); the compute-matched full-pool and random baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5), sharey=True)
    methods = [m[0] for m in METHODS]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    markers = {0.75: "o", 0.5: "s", 0.25: "^"}
    for ax, balanced in zip(axes, (False, True)):
        baselines = sorted(
            [t for t in table if t["kind"] in ("full", "matched") and t["keep_ratio"] == 1.0],
            key=lambda t: t["compute_s_mean"],
        )
        ax.plot(
            [t["compute_s_mean"] for t in baselines],
            [100 * t["pgd_mean"] for t in baselines],
            "k--",
            label="full pool, more epochs",
        )
        for ratio in args.ratios:
            matched = sorted(
                [t for t in table if t["kind"] == "matched" and t["keep_ratio"] == ratio],
                key=lambda t: t["compute_s_mean"],
            )
            ax.plot(
                [t["compute_s_mean"] for t in matched],
                [100 * t["pgd_mean"] for t in matched],
                ":",
                color="grey",
                marker=markers.get(ratio, "o"),
                markersize=4,
                label=f"random {ratio:g}, more epochs",
            )
        for t in table:
            if t["kind"] != "pruned" or t["class_balanced"] != balanced:
                continue
            y = 100 * t["pgd_mean"]
            ax.errorbar(
                t["compute_s_mean"],
                y,
                yerr=[[y - 100 * t["pgd_min"]], [100 * t["pgd_max"] - y]],
                color=colors[t["method"]],
                marker=markers.get(t["keep_ratio"], "o"),
                capsize=2,
                linestyle="none",
            )
        for m in methods:
            ax.plot([], [], color=colors[m], marker="o", linestyle="none", label=m)
        ax.set_xlabel("compute: score + select + train (s, this machine)")
        ax.set_title(f"class-balanced {'on' if balanced else 'off'} (o 0.75, square 0.5, triangle 0.25 kept)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PGD-20 accuracy (%)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"Robust accuracy against compute, embedded default, scope='synthetic' (mean, min..max over seeds {args.seeds})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
