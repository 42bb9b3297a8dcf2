"""The pruning comparison on the embedded default: every strategy x keep ratio x seed, one table and one plot.

    pip install -e ".[bench]"
    python benchmarks/pruning_study.py [--seeds 0 1] [--ratios 0.75 0.5 0.25] [--epochs 10] [--workdir runs/study]

Runs, in this process, configs/default.py with a shorter schedule (--epochs for
both the scoring and the final model; PGD-20 evaluation, no APGD) for:

  random                      uniform random subset
  prune_easy / prune_hard     drop the highest / lowest DeepFool L-inf margins
  puma                        prune_easy + eps lowered to the margin below eps
  keep_top du (extrapolated)  Nieth et al.: DU of a per-epoch history on the originals
                              + a 4,000-image synthetic subset, kNN-extrapolated (k=12)
  keep_top el2n               keep the highest EL2N (2 scoring models)
  keep_bottom el2n            keep the lowest EL2N (the easy samples)

at each keep ratio, plus the full pool (keep ratio 1.0), for each seed (the seed
changes the data order, initialisation and scoring models, not the data). Each
score is computed once per seed and shared by the runs that use it. Every run is
a normal work directory under --workdir (rerunning skips finished runs). Writes
benchmarks/results/pruning_study.{json,md,png}: clean and PGD-20 accuracy of the
EMA weights on the 269 test digits, mean and spread (min..max) over seeds.
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

# (label, strategy, score, extra overrides of config.scoring)
METHODS = [
    ("random", "random", None, {}),
    ("prune_easy", "prune_easy", "margin", {}),
    ("prune_hard", "prune_hard", "margin", {}),
    ("puma", "puma", "margin", {}),
    ("keep_top du (extrapolated)", "keep_top", "du", {"extrapolation": {"enabled": True, "subset_size": 4000}, "du_window": 5}),
    ("keep_top el2n", "keep_top", "el2n", {}),
    ("keep_bottom el2n", "keep_bottom", "el2n", {}),
]


def study_config(strategy: str, score: str | None, scoring: dict, keep_ratio: float, seed: int, epochs: float):
    from configs import default

    c = default.get_config()
    c.seed = seed
    c.train.epochs = epochs
    c.scoring.train_epochs = epochs
    c.eval.attack = "pgd"
    c.pruning.strategy = strategy
    c.pruning.keep_ratio = keep_ratio
    if score is not None:
        c.scoring.score = score
    for key, value in scoring.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                c.scoring[key][sub] = v
        else:
            c.scoring[key] = value
    return c


def share_scores(source: str, target: str) -> None:
    """Copies a finished score phase (scores/, settings/score.json, scoring models) into a new run directory."""
    os.makedirs(os.path.join(target, "settings"), exist_ok=True)
    for name in ("scores", "data"):
        if os.path.exists(os.path.join(source, name)) and not os.path.exists(os.path.join(target, name)):
            shutil.copytree(os.path.join(source, name), os.path.join(target, name))
    settings = os.path.join(source, "settings", "score.json")
    if os.path.exists(settings) and not os.path.exists(os.path.join(target, "settings", "score.json")):
        shutil.copy(settings, os.path.join(target, "settings", "score.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "study"))
    args = parser.parse_args()

    from jax_advprune import parallel
    from jax_advprune.main import setup_logging

    setup_logging()
    parallel.use_cpu_devices()
    from jax_advprune.data.splits import load_data
    from jax_advprune.main import run
    from jax_advprune.phases import score as score_phase

    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        runs = [("full pool", "random", None, {}, 1.0)] + [(label, strategy, score, scoring, ratio) for ratio in args.ratios for label, strategy, score, scoring in METHODS]
        for label, strategy, score, scoring, ratio in runs:
            name = f"seed{seed}/{label.replace(' ', '_').replace('(', '').replace(')', '')}_keep{ratio}"
            workdir = os.path.join(args.workdir, name)
            if score is not None:  # share the score phase of the first run that computed it
                score_key = f"seed{seed}/scores_{score}"
                source = os.path.join(args.workdir, score_key)
                if not os.path.exists(os.path.join(source, "scores", "meta.json")):  # the score phase alone
                    config = study_config(strategy, score, scoring, ratio, seed, args.epochs)
                    os.makedirs(source, exist_ok=True)
                    score_phase.run(config, source, load_data(config, source), parallel.make_mesh(config.num_devices or None))
                share_scores(source, workdir)
            if not os.path.exists(os.path.join(workdir, "results.json")):
                run(study_config(strategy, score, scoring, ratio, seed, args.epochs), workdir)
            results = json.load(open(os.path.join(workdir, "results.json")))
            ema = results["results"]["ema"]
            rows.append(dict(method=label, keep_ratio=ratio, seed=seed, kept=results["kept"], clean=ema["clean_accuracy"], pgd=ema["pgd_accuracy"]))
            print(f"== {name}: clean {ema['clean_accuracy']:.4f} PGD-20 {ema['pgd_accuracy']:.4f} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    write_outputs(rows, args)


def write_outputs(rows: list[dict], args) -> None:
    import numpy as np

    methods = ["full pool"] + [m[0] for m in METHODS]
    table = []
    for method in methods:
        for ratio in sorted({r["keep_ratio"] for r in rows if r["method"] == method}, reverse=True):
            sel = [r for r in rows if r["method"] == method and r["keep_ratio"] == ratio]
            clean, pgd = np.array([r["clean"] for r in sel]), np.array([r["pgd"] for r in sel])
            table.append(dict(method=method, keep_ratio=ratio, seeds=len(sel), kept=int(np.mean([r["kept"] for r in sel])),
                              clean_mean=float(clean.mean()), clean_min=float(clean.min()), clean_max=float(clean.max()),
                              pgd_mean=float(pgd.mean()), pgd_min=float(pgd.min()), pgd_max=float(pgd.max())))
    lines = [
        f"Embedded default (digits, 1,528 originals + 20,000 generated), {args.epochs:g} epochs for the scoring and the final",
        f"models, seeds {args.seeds}; EMA weights on the 269 test images, L-inf eps 0.05, PGD-20. Mean (min..max over seeds).",
        "",
        "| method | keep ratio | kept | clean | PGD-20 |",
        "| --- | --- | --- | --- | --- |",
    ] + [
        f"| {t['method']} | {t['keep_ratio']:g} | {t['kept']:,} | {100 * t['clean_mean']:.1f} ({100 * t['clean_min']:.1f}..{100 * t['clean_max']:.1f}) "
        f"| {100 * t['pgd_mean']:.1f} ({100 * t['pgd_min']:.1f}..{100 * t['pgd_max']:.1f}) |"
        for t in table
    ]
    out_dir = os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pruning_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "pruning_study.json"), "w") as f:
        json.dump({"settings": vars(args), "runs": rows, "table": table}, f, indent=2)
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [t for t in table if t["method"] == "full pool"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "clean", "clean accuracy"), (axes[1], "pgd", "PGD-20 accuracy")):
        for method in methods[1:]:
            points = sorted([t for t in table if t["method"] == method] + full, key=lambda t: t["keep_ratio"])
            x = [t["keep_ratio"] for t in points]
            y = [100 * t[f"{metric}_mean"] for t in points]
            err = [[100 * (t[f"{metric}_mean"] - t[f"{metric}_min"]) for t in points], [100 * (t[f"{metric}_max"] - t[f"{metric}_mean"]) for t in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Pruning strategies on the embedded default (mean, min..max over seeds {args.seeds})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pruning_study.png"), dpi=120)
    print(f"wrote {out_dir}/pruning_study.{{md,json,png}}")


if __name__ == "__main__":
    main()
