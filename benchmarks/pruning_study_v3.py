"""Study v3: the papers' claims in the papers' regime: converged final training, margins from a converged robust
model, a redundant pool, and a held-out test split that can tell 1 point from noise.

    pip install -e ".[bench]"
    python benchmarks/pruning_study_v3.py [--pools 20000 200000] [--seeds 0 1 2] [--seeds-of 20000=0] [--ratios 0.5 0.25] [--ratios-of 1=0.25]
        [--lengths 24 32 43 57 76 101 135 180 240 320 427 569 759] [--epochs E] [--workdir runs/study_v3] [--report-only]

What it runs (configs/default.py's digits: 1,528 real originals + a generated pool;
pruning.scope='synthetic', class-balanced, batches of 30% originals, an epoch of 12
steps whatever the pool holds, so every run of a pool trains the same steps):

1. Convergence. The full pool (the largest of --pools, seed 0) is trained for each
   of --lengths epochs in turn (each a separate run with its own cosine schedule)
   and scored by PGD-20 on the held-out generated split. The final-training length
   is the first length L whose accuracy is less than 0.5 points above that of the
   length nearest 0.75 L: it stops improving over the last 25% of the epochs. Every
   final run trains L epochs. (--epochs E skips this and uses E.)
2. Per pool size and seed:
   - full pool: trained L epochs (at seed 0 of the largest pool, the convergence
     run of L itself, copied and evaluated again with the grid's attacks). Its EMA
     weights are also PUMA's margin model (scoring.init_from), a robust model
     trained to convergence (or as long as --lengths allow), as in the PUMA paper,
     so the margin score costs DeepFool over the pool alone (the model's training
     is reported beside it, since a user without one pays it).
   - DU, extrapolated: Nieth et al.'s protocol: a history run on a random 5% of the
     generated pool alone (scoring.history_protocol='reference', DU window 10, as
     many steps as a final run in passes over the subset, at least 10), kNN-
     extrapolated (k = 12, L2-normalised penultimate features of that run's model)
     to the whole pool.
   - at each keep ratio: random, PUMA, keep_top DU (extrapolated) and prune_hard
     (the lowest margins dropped), class-balanced.
3. Every final model is evaluated (EMA weights) on the 269 real test digits and on
   a held-out generated split (--held-out images of the pool's generator with a
   disjoint seed, never trained on: samples of the generator, not real data):
   clean, PGD-20, APGD-CE and APGD-CE + APGD-T (3 targets), APGD at --apgd-steps
   iterations (25: AutoAttack's 100 would cost an estimated 2-3 minutes per run on
   10,000 images on 2 cores, from PGD-20's 9 s there, more than a run's training).
4. Seeds: --seeds at every pool, except where --seeds-of names a pool: by default
   3 seeds at 200,000 (where extrapolation claims its saving) and one at 20,000.
   A run of L epochs trains in about L x 0.8-1.3 s here (the speed varies by
   day); when L is long, trim the grid (--seeds, --seeds-of, --ratios,
   --ratios-of) before it starts, never the convergence.

Reported: per cell, mean and min..max over seeds of each accuracy on both splits,
and each run's measured seconds split into score, select and train; paired
differences against random at the same pool, keep ratio and seed (mean, min..max);
the scoring cost of margins (DeepFool over the pool, plus the margin model's
training) against DU on 5% plus the kNN. Every run is a normal work directory
under --workdir: a rerun after a kill skips what finished (a score phase killed
midway restarts clean, so that its seconds are whole). Writes
benchmarks/results/pruning_study_v3.{json,md,png}.
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
from tables import _table  # noqa: E402  (the documents' Markdown table, head and rows)

from jax_advprune import run_dir, storage  # noqa: E402  (no jax: safe before the device count is set)

STRATEGIES = [  # (label, strategy, score)
    ("random", "random", None),
    ("puma", "puma", "margin"),
    ("keep_top du (extrapolated)", "keep_top", "du"),
    ("prune_hard", "prune_hard", "margin"),
]
SPLITS = {"test": "269 real test digits", "held_out": "held-out generated split"}
METRICS = {
    "clean": "clean_accuracy",
    "pgd": "pgd_accuracy",
    "apgd_ce": "apgd_ce_accuracy",
    "aa": "autoattack_lite_accuracy",
}
# The tables' accuracy columns: (key of a row, header), the held-out split first (it has the resolution).
ACCURACY_COLUMNS = [
    (f"{split}_{metric}", f"{where} {what}")
    for split, where in (("held_out", "held-out"), ("test", "test"))
    for metric, what in (("clean", "clean"), ("pgd", "PGD-20"), ("aa", "APGD-CE+T"))
]
CONVERGED_GAIN = 0.005  # less than 0.5 points over the last 25% of the epochs


def meets_rule(gain: float | None) -> bool:
    """Whether a length's gain over the length nearest 0.75 x it (a fraction; None for the shortest) converged."""
    return gain is not None and gain < CONVERGED_GAIN


def finished(workdir: str) -> bool:
    """Whether the run in `workdir` has evaluated (its results file exists)."""
    return os.path.exists(run_dir.results_file(workdir))


def v3_config(
    pool: int,
    seed: int,
    epochs: float,
    *,
    strategy: str = "random",
    keep_ratio: float = 1.0,
    score: str | None = None,
    held_out: int = 10_000,
    robust_evaluation: str = "autoattack_lite",
    apgd_steps: int = 100,
    margin_model: str = "",
    subset_fraction: float = 0.05,
):
    """configs/default.py in the study's setting (see the module docstring)."""
    from configs import default

    c = default.get_config()
    c.seed = seed
    c.data.synthetic_size = pool
    c.train.epochs = epochs
    c.pruning.strategy = strategy
    c.pruning.keep_ratio = keep_ratio
    c.pruning.scope = "synthetic"
    c.pruning.class_balanced = True
    c.eval.generated_test_size = held_out
    c.eval.weights = ("ema",)
    c.eval.attack = robust_evaluation
    c.eval.apgd_steps = apgd_steps
    if score is not None:
        c.scoring.score = score
    if score == "margin":
        c.scoring.init_from = margin_model
    if score == "du":
        subset = max(1, round(subset_fraction * pool))
        c.scoring.train_epochs = du_passes(subset, epochs, c.train.batch_size)
        c.scoring.du_window = min(10, int(c.scoring.train_epochs))  # DU needs as many records as its window
        c.scoring.history_protocol = "reference"
        c.scoring.extrapolation.enabled = True
        c.scoring.extrapolation.subset_size = subset
        c.scoring.extrapolation.seed = seed  # the subset is part of what a seed varies
        c.scoring.extrapolation.normalize = "l2"
    return c


EPOCH_STEPS = 12  # ceil(1,528 originals / batch 128): an epoch of the final training, whatever the pool holds


def du_passes(subset: int, epochs: float, batch: int, window: int = 10) -> int:
    """Passes over the DU subset in its history run: as many steps as the final run (`epochs` x EPOCH_STEPS), and at
    least `window` passes, one DU record each. (configs/cifar10_extrapolation.py allows up to twice the final run's
    steps: 400 passes over 100k images at batch 512, early-stopped, against 400 epochs of 98 steps.)"""
    steps_per_pass = -(-subset // batch)
    return max(window, round(epochs * EPOCH_STEPS / steps_per_pass))


def length_grid_neighbour(lengths: list[float], length: float) -> float | None:
    """The length of `lengths` nearest 0.75 x `length` among the shorter ones (None for the shortest)."""
    shorter = [x for x in lengths if x < length]
    return min(shorter, key=lambda x: abs(x - 0.75 * length)) if shorter else None


def converged_length(curve: list[dict]) -> tuple[float | None, list[dict]]:
    """(the first length whose held-out PGD-20 accuracy is less than CONVERGED_GAIN above that of the length nearest
    0.75 x it, or None; the curve with each point's 'gain' over that shorter length) from points
    {'epochs', 'held_out_pgd', ...} sorted by epochs."""
    lengths = [p["epochs"] for p in curve]
    by_length = {p["epochs"]: p for p in curve}
    chosen, marked = None, []
    for point in curve:
        previous = length_grid_neighbour(lengths, point["epochs"])
        gain = None if previous is None else point["held_out_pgd"] - by_length[previous]["held_out_pgd"]
        marked.append(point | {"gain": gain, "compared_with": previous})
        if chosen is None and meets_rule(gain):
            chosen = point["epochs"]
    return chosen, marked


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per (pool, keep ratio, strategy other than random): each metric on each split minus random's at the same
    pool, keep ratio and seed; mean and min..max over the seeds that have both."""
    out = []
    keys = sorted({(r["pool"], r["keep_ratio"], r["method"]) for r in rows if r["kind"] == "pruned"})
    for pool, ratio, method in keys:
        if method == "random":
            continue
        pairs = []
        for r in rows:
            if (r["pool"], r["keep_ratio"], r["method"]) != (pool, ratio, method):
                continue
            base = next(
                (
                    b
                    for b in rows
                    if (b["pool"], b["keep_ratio"], b["method"], b["seed"]) == (pool, ratio, "random", r["seed"])
                ),
                None,
            )
            if base is not None:
                pairs.append((r, base))
        if not pairs:
            continue
        line = {"pool": pool, "keep_ratio": ratio, "method": method, "seeds": [r["seed"] for r, _ in pairs]}
        for split in SPLITS:
            for metric in METRICS:
                key = f"{split}_{metric}"
                diffs = [r[key] - b[key] for r, b in pairs]
                line[key] = _spread(diffs)
        out.append(line)
    return out


def _spread(values) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (pool, method, keep ratio) over seeds: each accuracy's mean and min..max, and the seconds."""
    table = []
    for key in dict.fromkeys((r["pool"], r["method"], r["keep_ratio"]) for r in rows):
        sel = [r for r in rows if (r["pool"], r["method"], r["keep_ratio"]) == key]
        line = {
            "pool": key[0],
            "method": key[1],
            "keep_ratio": key[2],
            "kind": sel[0]["kind"],
            "seeds": [r["seed"] for r in sel],
            "kept": round(sum(r["kept"] for r in sel) / len(sel)),
            "epochs": sel[0]["epochs"],
        }
        for split in SPLITS:
            for metric in METRICS:
                line[f"{split}_{metric}"] = _spread([r[f"{split}_{metric}"] for r in sel])
        for part in ("score_s", "select_s", "train_s", "compute_s"):
            line[part] = _spread([r[part] for r in sel])
        table.append(line)
    return table


class StudyV3:
    """Runs (or reuses) the study's work directories and collects one row per run."""

    def __init__(self, args):
        from jax_advprune import parallel

        self.args, self.rows, self.not_run = args, [], []
        self.mesh = parallel.make_mesh(None)
        self.start = time.perf_counter()

    def _path(self, *parts) -> str:
        return os.path.join(self.args.workdir, *parts)

    def _score_dir(self, config, score: str) -> str:
        """<workdir>/pool<N>/epochs<E>/seed<s>/scores_<score>: the score phase every run of that cell shares."""
        return self._path(
            f"pool{config.data.synthetic_size}",
            f"epochs{config.train.epochs:g}",
            f"seed{config.seed}",
            f"scores_{score}",
        )

    def shared_data(self, pool: int) -> str:
        """<workdir>/data_<pool>: the pool and the held-out split, written once and linked into every run of that
        pool size (the files a run would write itself, with the same settings)."""
        from jax_advprune.data.generate import write_embedded_default, write_held_out_generated

        config = v3_config(pool, 0, 1.0, held_out=self.args.held_out)
        data_dir = self._path(f"data_{pool}")
        settings = dict(
            image_size=config.data.image_size,
            synthetic_size=pool,
            test_fraction=config.data.test_fraction,
            seed=config.data.seed,
        )
        write_embedded_default(data_dir, **settings)
        write_held_out_generated(data_dir, size=self.args.held_out, **settings)
        return data_dir

    def _link_data(self, workdir: str, pool: int) -> None:
        os.makedirs(workdir, exist_ok=True)
        link = os.path.join(workdir, "data")
        if not os.path.lexists(link):
            os.symlink(self.shared_data(pool), link)

    def score_seconds(self, config, score: str) -> float:
        """Computes (once) the score phase of `config` into its `_score_dir` -> its seconds."""
        from jax_advprune.data.splits import load_data
        from jax_advprune.phases import score as score_phase

        source = self._score_dir(config, score)
        timing = os.path.join(source, "score_seconds.json")
        if not os.path.exists(timing):
            shutil.rmtree(source, ignore_errors=True)  # a killed score phase restarts clean: its seconds are whole
            self._link_data(source, config.data.synthetic_size)
            begin = time.perf_counter()
            data = load_data(config, run_dir.data_dir(source))
            initial = None
            if config.scoring.init_from:  # the margin model: a work directory's best-validation EMA weights
                from jax_advprune.phases.weights import load_variables

                initial = load_variables(config.scoring.init_from, config, data.pool.image_shape)
            score_phase.run(config, source, data, self.mesh, initial)
            storage.write_json(timing, {"seconds": time.perf_counter() - begin})
        return storage.read_json(timing)["seconds"]

    def run(self, name: str, label: str, config, *, kind: str, score: str | None = None, **extra) -> dict | None:
        """One work directory -> its row; a finished directory is read, not rerun. With --finished-only, an
        unfinished one is recorded in `self.not_run` and nothing runs -> None."""
        from pruning_study import share_scores

        from jax_advprune.main import run

        pool = config.data.synthetic_size
        workdir = self._path(f"pool{pool}", name)
        if self.args.finished_only and not finished(workdir):
            self.not_run.append(f"pool{pool}/{name}")
            return None
        score_s = 0.0
        self._link_data(workdir, pool)  # first: share_scores then leaves the linked data alone
        if score is not None:
            score_s = self.score_seconds(config, score)
            share_scores(self._score_dir(config, score), workdir)
        if not finished(workdir):
            run(config, workdir)
        results = storage.read_json(run_dir.results_file(workdir))
        timings = storage.read_json(run_dir.timings_file(workdir))
        row = dict(
            name=name,
            method=label,
            kind=kind,
            pool=pool,
            seed=config.seed,
            keep_ratio=config.pruning.keep_ratio,
            score=score,
            epochs=config.train.epochs,
            kept=results["kept"],
            score_s=round(score_s, 2),
            select_s=timings.get("select", 0.0),
            train_s=timings["train"],
            evaluate_s=timings.get("evaluate"),
            compute_s=round(score_s + timings.get("select", 0.0) + timings["train"], 2),
            **extra,
        )
        for split, where in (("test", results["results"]), ("held_out", results["held_out_generated"]["results"])):
            for metric, key in METRICS.items():
                if key in where["ema"]:
                    row[f"{split}_{metric}"] = where["ema"][key]
        self.rows.append(row)
        print(
            f"== pool {pool} {name}: held-out clean {row['held_out_clean']:.4f} PGD-20 {row['held_out_pgd']:.4f}; "
            f"test PGD-20 {row['test_pgd']:.4f}; compute {row['compute_s']:.1f}s "
            f"({(time.perf_counter() - self.start) / 60:.1f} min)",
            flush=True,
        )
        return row

    def convergence(self) -> tuple[float, list[dict]]:
        """Runs the full pool at each --lengths (ascending) until the accuracy stops improving -> (L, curve)."""
        args, pool = self.args, max(self.args.pools)
        curve = []
        for epochs in sorted(args.lengths):
            config = v3_config(pool, 0, epochs, held_out=args.held_out, robust_evaluation="pgd")
            row = self.run(f"convergence/epochs{epochs:g}", "full pool", config, kind="convergence")
            if row is None:  # --finished-only: the curve ends at the first length not run
                break
            curve.append({k: row[k] for k in ("epochs", "held_out_pgd", "held_out_clean", "test_pgd", "train_s")})
            chosen, marked = converged_length(curve)
            if chosen is not None:
                return chosen, marked
        chosen, marked = converged_length(curve)
        longest = max(args.lengths)
        print(f"!! no length in {sorted(args.lengths)} met the criterion; using the longest, {longest:g}", flush=True)
        return longest, marked

    def reuse_convergence_run(self, pool: int, seed: int, epochs: float, name: str) -> str | None:
        """The convergence run of `epochs` trained the full pool at seed 0 exactly as the grid's full-pool run would
        (only eval differs): its directory is copied to `name` without its evaluation, so the grid's full pool, and
        with it PUMA's margin model, is that run's training, evaluated again with the grid's attacks. -> the copied
        run's name, or None when there is none to copy (another pool or seed, or --epochs without convergence)."""
        source = self._path(f"pool{pool}", "convergence", f"epochs{epochs:g}")
        target = self._path(f"pool{pool}", name)
        if seed != 0 or pool != max(self.args.pools) or not finished(source):
            return None
        if not finished(target) and not self.args.finished_only:
            shutil.rmtree(target, ignore_errors=True)  # a copy killed midway starts again
            shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("lock", "tensorboard"))
            evaluated = (
                run_dir.results_file(target),
                run_dir.report_file(target),
                run_dir.settings_file(target, "evaluate"),
            )
            for written_by_evaluate in evaluated:
                os.remove(written_by_evaluate)
            timings = storage.read_json(run_dir.timings_file(target))
            timings.pop("evaluate", None)  # the phase runs again and adds its own seconds
            storage.write_json(run_dir.timings_file(target), timings)
        return os.path.relpath(source, self._path(f"pool{pool}"))

    def pool_seed(self, pool: int, seed: int, epochs: float) -> None:
        """The grid at `pool` and `seed`, every run training `epochs` (in the run names, so that runs of another
        length are never mistaken for these)."""
        args = self.args
        common = dict(held_out=args.held_out, apgd_steps=args.apgd_steps)
        where = f"epochs{epochs:g}/seed{seed}"
        reused = self.reuse_convergence_run(pool, seed, epochs, f"{where}/full_pool")
        full = self.run(
            f"{where}/full_pool",
            "full pool",
            v3_config(pool, seed, epochs, **common),
            kind="full",
            **({"trained_in": reused} if reused else {}),
        )
        if full is None:  # --finished-only: nothing of this seed can have run without its full pool
            return
        margin_model = self._path(f"pool{pool}", where, "full_pool")
        for ratio in ratios_of(args, seed):
            for label, strategy, score in STRATEGIES:
                config = v3_config(
                    pool,
                    seed,
                    epochs,
                    strategy=strategy,
                    keep_ratio=ratio,
                    score=score,
                    margin_model=margin_model,
                    subset_fraction=args.subset_fraction,
                    **common,
                )
                slug = label.split(" ")[0] if score != "du" else "du_extrapolated"
                self.run(
                    f"{where}/{slug}_keep{ratio:g}",
                    label,
                    config,
                    kind="pruned",
                    score=score,
                    margin_model_train_s=full["train_s"] if score == "margin" else 0.0,
                )


def scoring_costs(rows: list[dict]) -> list[dict]:
    """Per pool: the margin score's seconds (DeepFool over the pool) and its model's training, against DU's (a
    history run on the subset, the embedding and the kNN), mean and min..max over seeds."""
    out = []
    for pool in sorted({r["pool"] for r in rows}):
        line = {"pool": pool}
        for score, label in (("margin", "puma"), ("du", "keep_top du (extrapolated)")):
            sel = {r["seed"]: r for r in rows if r["pool"] == pool and r["method"] == label}
            if sel:
                line[f"{score}_score_s"] = _spread([r["score_s"] for r in sel.values()])
                if score == "margin":
                    line["margin_model_train_s"] = _spread([r["margin_model_train_s"] for r in sel.values()])
        out.append(line)
    return out


def _pct(cell: dict) -> str:
    return f"{100 * cell['mean']:.1f} ({100 * cell['min']:.1f}..{100 * cell['max']:.1f})"


def _pts(cell: dict) -> str:
    return f"{100 * cell['mean']:+.1f} ({100 * cell['min']:+.1f}..{100 * cell['max']:+.1f})"


def length_used(result: dict) -> str:
    """'chosen' where the final-training length met the convergence rule, else what it is: the longest."""
    point = next((p for p in result["convergence"] if p["epochs"] == result["epochs"]), None)
    if point is None:
        return "given by --epochs"
    return "chosen" if meets_rule(point["gain"]) else "used: the longest; rule not met"


def convergence_table(result: dict) -> list[str]:
    """The convergence curve: per length, held-out clean and PGD-20, the gain over the length nearest 0.75 x it,
    test PGD-20 and the training seconds."""

    def used(p: dict) -> str:  # the length the final runs train
        return f" ({length_used(result)})" if p["epochs"] == result["epochs"] else ""

    rows = [
        [
            f"{p['epochs']:g}{used(p)}",
            f"{100 * p['held_out_clean']:.1f}",
            f"{100 * p['held_out_pgd']:.1f}",
            "" if p["gain"] is None else f"{100 * p['gain']:+.2f} (vs {p['compared_with']:g})",
            f"{100 * p['test_pgd']:.1f}",
            f"{p['train_s']:.0f}",
        ]
        for p in result["convergence"]
    ]
    return _table(["epochs", "held-out clean", "held-out PGD-20", "gain (points)", "test PGD-20", "train s"], rows)


def grid_table(result: dict) -> list[str]:
    """Per pool, method and keep ratio: kept count, accuracies on both splits (mean (min..max) over seeds, %) and
    the measured seconds of score, select and train."""
    rows = [
        [
            f"{t['pool']:,}",
            t["method"],
            f"{t['keep_ratio']:g}",
            f"{t['kept']:,}",
            str(len(t["seeds"])),
            *(_pct(t[key]) for key, _ in ACCURACY_COLUMNS),
            f"{t['score_s']['mean']:.0f}",
            f"{t['select_s']['mean']:.1f}",
            f"{t['train_s']['mean']:.0f}",
        ]
        for t in result["table"]
        if t["kind"] != "convergence"
    ]
    head = ["pool", "method", "keep", "kept", "seeds"] + [name for _, name in ACCURACY_COLUMNS]
    return _table(head + ["score s", "select s", "train s"], rows)


def paired_table(result: dict) -> list[str]:
    """Each pruned cell minus random at the same pool, keep ratio and seed, in points (mean (min..max) over seeds)."""
    rows = [
        [
            f"{d['pool']:,}",
            d["method"],
            f"{d['keep_ratio']:g}",
            str(len(d["seeds"])),
            *(_pts(d[key]) for key, _ in ACCURACY_COLUMNS),
        ]
        for d in result["paired"]
    ]
    return _table(["pool", "method minus random", "keep", "seeds"] + [name for _, name in ACCURACY_COLUMNS], rows)


def scoring_cost_table(result: dict) -> list[str]:
    """Per pool: margins (DeepFool over the pool, and the margin model's training) against DU on the subset + kNN,
    seconds (mean over seeds)."""
    rows = []
    for c in result["scoring_costs"]:
        cells = [c.get("margin_score_s"), c.get("margin_model_train_s"), c.get("du_score_s")]
        rows.append([f"{c['pool']:,}"] + ["" if cell is None else f"{cell['mean']:.0f}" for cell in cells])
    head = ["pool", "margins: DeepFool over the pool", "+ margin model's training", "DU on the subset + kNN"]
    return _table(head, rows)


def tables(result: dict) -> list[str]:
    """The study's Markdown: the convergence curve, the accuracy table of both splits, the paired differences and
    the scoring costs, each with its caption."""
    s = result["settings"]
    seeds = sorted({r["seed"] for r in result["runs"]})
    return [
        f"Convergence (full pool of {max(s['pools']):,}, seed 0; PGD-20 of the EMA weights on the {s['held_out']:,}-image "
        "held-out generated split; gain: over the length nearest 0.75 x it):",
        "",
        *convergence_table(result),
        "",
        f"Final runs: {result['epochs']:g} epochs of 12 steps each (equal steps for every run), seeds {seeds}, "
        "class-balanced, EMA weights. Mean (min..max over seeds), %. Held-out: generated images, not real data.",
        "",
        *grid_table(result),
        "",
        "Paired differences against random at the same pool, keep ratio and seed (points; mean, min..max over seeds):",
        "",
        *paired_table(result),
        "",
        "Scoring cost (s, mean over seeds): margins = DeepFool over the pool with the converged full-pool model "
        f"(+ that model's training, if one has to be trained); DU = a history run on {100 * s['subset_fraction']:g}% "
        "of the pool + embedding + kNN.",
        "",
        *scoring_cost_table(result),
        *(
            ["", "Not run (the grid was stopped before them): " + ", ".join(result["not_run"]) + "."]
            if result.get("not_run")
            else []
        ),
    ]


def write_outputs(result: dict, out_dir: str = os.path.join(REPO, "benchmarks", "results")) -> None:
    os.makedirs(out_dir, exist_ok=True)
    lines = tables(result)
    with open(os.path.join(out_dir, "pruning_study_v3.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "pruning_study_v3.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("\n".join(lines))
    plot(result, os.path.join(out_dir, "pruning_study_v3.png"))
    print(f"wrote {out_dir}/pruning_study_v3.{{md,json,png}}")


def plot(result: dict, path: str) -> None:
    """Left: the convergence curve. Right: held-out PGD-20 against keep ratio per method and pool (mean,
    min..max bars), the full pool as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    curve = result["convergence"]
    left.plot([p["epochs"] for p in curve], [100 * p["held_out_pgd"] for p in curve], "o-", label="held-out PGD-20")
    left.axvline(
        result["epochs"], color="grey", linestyle=":", label=f"{result['epochs']:g} epochs ({length_used(result)})"
    )
    left.set_xlabel("epochs (12 steps each)")
    left.set_ylabel("accuracy (%)")
    left.set_title("full pool: final-training length")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    styles = {pool: style for pool, style in zip(sorted(result["settings"]["pools"]), ("-", "--", ":"))}
    for i, (label, _, _) in enumerate(STRATEGIES):
        for pool, style in styles.items():
            rows = sorted(
                [t for t in result["table"] if t["method"] == label and t["pool"] == pool],
                key=lambda t: t["keep_ratio"],
            )
            if not rows:
                continue
            y = [100 * t["held_out_pgd"]["mean"] for t in rows]
            err = [
                [m - 100 * t["held_out_pgd"]["min"] for m, t in zip(y, rows)],
                [100 * t["held_out_pgd"]["max"] - m for m, t in zip(y, rows)],
            ]
            right.errorbar(
                [t["keep_ratio"] for t in rows],
                y,
                yerr=err,
                color=plt.cm.tab10(i),
                linestyle=style,
                marker="o",
                capsize=2,
                label=f"{label}, pool {pool:,}",
            )
    for pool, style in styles.items():
        full = next((t for t in result["table"] if t["kind"] == "full" and t["pool"] == pool), None)
        if full:
            right.axhline(100 * full["held_out_pgd"]["mean"], color="k", linestyle=style, label=f"full pool {pool:,}")
    right.set_xlabel("keep ratio of the generated pool")
    right.set_title("held-out PGD-20 at equal training steps")
    right.legend(fontsize=7, loc="center left")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def seeds_of(args, pool: int) -> list[int]:
    """The seeds run at `pool`: --seeds, unless --seeds-of names that pool ('20000=0,1')."""
    for entry in args.seeds_of:
        size, _, seeds = entry.partition("=")
        if int(size) == pool:
            return [int(s) for s in seeds.split(",")]
    return list(args.seeds)


def ratios_of(args, seed: int) -> list[float]:
    """The keep ratios run at `seed`: --ratios, except where --ratios-of names the seed (e.g. 1=0.25)."""
    for entry in args.ratios_of:
        named, ratios = entry.split("=")
        if int(named) == seed:
            return [float(r) for r in ratios.split(",")]
    return args.ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--seeds-of", nargs="*", default=["20000=0"], help="per-pool seeds, e.g. 20000=0 (default: --seeds)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument(
        "--ratios-of", nargs="*", default=[], help="per-seed keep ratios, e.g. 1=0.25 (default: --ratios)"
    )
    parser.add_argument(
        "--lengths", type=float, nargs="+", default=[24, 32, 43, 57, 76, 101, 135, 180, 240, 320, 427, 569, 759]
    )
    parser.add_argument("--epochs", type=float, default=None, help="skip the convergence runs; train this long")
    parser.add_argument("--held-out", type=int, default=10_000)
    parser.add_argument("--apgd-steps", type=int, default=25)
    parser.add_argument("--subset-fraction", type=float, default=0.05)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "study_v3"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: report the runs of this grid that finished, and list those that did not",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the outputs from benchmarks/results/pruning_study_v3.json"
    )
    hygiene.add_arguments(parser)
    args = parser.parse_args()
    if args.report_only:
        with open(os.path.join(args.results_dir, "pruning_study_v3.json")) as f:
            write_outputs(json.load(f), args.results_dir)
        return
    guard = hygiene.IdleGuard(args.allow_busy)
    from jax_advprune import parallel
    from jax_advprune.main import setup_logging

    setup_logging()
    parallel.use_cpu_devices()
    begin = time.perf_counter()
    study = StudyV3(args)
    if args.epochs is None:
        epochs, curve = study.convergence()
    else:
        epochs, curve = args.epochs, []
    for pool in args.pools:
        for seed in seeds_of(args, pool):
            study.pool_seed(pool, seed, epochs)
    runs = [r for r in study.rows if r["kind"] != "convergence"]
    scores = {(r["pool"], r["seed"], r["score"]): r["score_s"] for r in runs if r["score"]}
    # Every run's measured phases (a rerun that skipped finished runs still counts them), each score once.
    measured = sum(r["select_s"] + r["train_s"] + (r["evaluate_s"] or 0.0) for r in study.rows) + sum(scores.values())
    machine = guard.finish() | {"cores": len(os.sched_getaffinity(0))}
    write_outputs(
        {
            "settings": vars(args),
            "machine": machine,
            "wall_seconds_this_invocation": round(time.perf_counter() - begin, 1),
            "measured_seconds_of_all_runs": round(measured, 1),
            "epochs": epochs,
            "convergence": curve,
            "runs": runs,
            "table": summarise(runs),
            "paired": paired_differences(runs),
            "scoring_costs": scoring_costs(runs),
            "not_run": study.not_run,
        },
        args.results_dir,
    )


if __name__ == "__main__":
    main()
