"""Evaluate phase: clean, PGD and AutoAttack (lite or standard) accuracy on the test split -> results.json, report.md.

With eval.generated_test_size > 0 (the embedded default), the same on a held-out
split drawn from the pool's generator, reported beside the test split's.

Evaluated: the final raw and EMA weights, and the EMA weights of the
best-validation checkpoint (`checkpoints_best/`, what the reference reports).
Every accuracy comes with its binomial standard error over the test split.
"""

from __future__ import annotations

import logging
import math
import os
import time

from jax_advprune import provenance, run_dir, storage
from jax_advprune.checkpoint import abstract_like, best_checkpoint_dir, best_checkpointer
from jax_advprune.data.splits import Data
from jax_advprune.errors import UserError
from jax_advprune.evaluation import autoattack_evaluator, pgd_evaluator
from jax_advprune.phases.common import apply_fn, build_model, section
from jax_advprune.phases.weights import WEIGHTS, saved_state, saved_variables
from jax_advprune.run_dir import final_checkpoint_dir

log = logging.getLogger("jax_advprune")

NAME = "evaluate"
HEADERS = {
    "clean_accuracy": "clean",
    "pgd_accuracy": "PGD",
    "apgd_ce_accuracy": "APGD-CE",
    "autoattack_lite_accuracy": "APGD-CE + APGD-T",
    "apgd_t_accuracy": "+ APGD-T",
    "fab_t_accuracy": "+ FAB-T",
    "autoattack_accuracy": "AutoAttack",
}
ATTACKS = ("pgd", "autoattack_lite", "autoattack")  # eval.attack: PGD is always reported; the others add AutoAttack


def settings(config) -> dict:
    return section(config, "eval") | {"eps": config.attack.eps, "norm": config.attack.norm}


def best_validation_state(workdir: str, like):
    """(train state, step) of the best-validation checkpoint in <workdir>/checkpoints_best, or (None, None) without one.

    `like`: a train state whose structure and placement the restored one takes.
    """
    if not storage.isdir(best_checkpoint_dir(final_checkpoint_dir(workdir))):
        return None, None
    checkpointer = best_checkpointer(final_checkpoint_dir(workdir))
    try:
        step = checkpointer.best_step()
        if step is None:
            return None, None
        return checkpointer.restore(abstract_like(like), step=step), int(step)
    finally:
        checkpointer.close()


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of an accuracy measured on n samples."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n else float("nan")


HELD_OUT = "held_out_generated"  # results.json's key (and evaluate_passes/ suffix) of the held-out generated split


def evaluate_weights(
    config, data: Data, mesh, model, candidates: dict, workdir: str | None = None
) -> tuple[dict, dict | None]:
    """({weights: {accuracy name: fraction, '<name>_se': its standard error}} on the test split, the same on the
    held-out generated split or None without one) for each set of variables in `candidates`.

    With a work directory, AutoAttack saves each pass under <workdir>/evaluate_passes/<weights>[_held_out_generated]/
    and resumes from them."""
    ecfg = config.eval
    common = dict(eps=config.attack.eps, norm=config.attack.norm, batch_size=ecfg.batch_size, mesh=mesh)
    evaluate_pgd = pgd_evaluator(
        apply_fn(model), step_size=config.attack.eps * ecfg.step_fraction, steps=ecfg.pgd_steps, **common
    )
    evaluate_aa = None
    if ecfg.attack != "pgd":
        evaluate_aa = autoattack_evaluator(
            apply_fn(model),
            version=ecfg.attack,
            apgd_steps=ecfg.apgd_steps,
            num_targets=ecfg.apgd_targets,
            fab_steps=ecfg.fab_steps,
            square_queries=ecfg.square_queries,
            **common,
        )

    def on_split(images, labels, suffix: str) -> dict:
        n = len(labels)
        results = {}
        for weights, variables in candidates.items():  # the same compiled evaluators for every set of weights
            accuracies = {k: v for k, v in evaluate_pgd(variables, images, labels, config.seed).items() if k != "n"}
            if evaluate_aa is not None:
                resume_dir = run_dir.evaluate_passes_dir(workdir, weights + suffix) if workdir else None
                accuracies.update(evaluate_aa(variables, images, labels, config.seed, resume_dir=resume_dir))
            results[weights] = accuracies | {f"{k}_se": standard_error(v, n) for k, v in accuracies.items()}
            log.info(
                "[evaluate] %s weights%s: %s",
                weights,
                f" ({HELD_OUT}, {n} images)" if suffix else "",
                ", ".join(f"{k} {v:.4f} ± {standard_error(v, n):.4f}" for k, v in accuracies.items()),
            )
        return results

    on_test = on_split(data.test_images, data.test_labels, "")
    if data.held_out_labels is None:
        return on_test, None
    return on_test, on_split(data.held_out_images, data.held_out_labels, "_" + HELD_OUT)


def _accuracy_table(results: dict, labels: dict, header: dict) -> list[str]:
    columns = [c for c in HEADERS if c in next(iter(results.values()))]
    return [
        "| weights | " + " | ".join(f"{header[c]} accuracy" for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ] + [
        f"| {labels[w]} | " + " | ".join(f"{r[c]:.4f} ± {r[c + '_se']:.4f}" for c in columns) + " |"
        for w, r in results.items()
    ]


def report(config, workdir: str, summary: dict, selection: dict | None) -> str:
    """report.md: what was kept, the threat model and the accuracy table (± one standard error), and the held-out
    generated split's table after it where there is one."""
    ecfg, results = config.eval, summary["results"]
    step, best = summary["checkpoint_step"], summary["best_validation_step"]
    labels = {
        "raw": f"raw (step {step})",
        "ema": f"EMA (step {step})",
        "best_ema": f"EMA, best validation (step {best})",
        "given": f"given weights ({config.eval.init_from})",
    }
    header = {**HEADERS, "pgd_accuracy": f"PGD-{ecfg.pgd_steps}"}
    kept = (
        f"Kept {selection['kept']} of {selection['pool_size']} pool samples; {selection['lowered_eps']} trained with a lowered eps."
        if selection
        else "Evaluation of given weights only (no selection or training in this work directory)."
    )
    title = (
        f"{config.pruning.strategy}, keep ratio {config.pruning.keep_ratio}"
        if selection
        else f"evaluation of {config.eval.init_from}"
    )
    lines = [
        f"# {os.path.basename(storage.absolute(workdir))}: {title}",
        "",
        kept,
        f"Test split: {summary['test_size']} images; {config.attack.norm} eps {config.attack.eps:.4g}; PGD-{ecfg.pgd_steps} (CE, random start)"
        + {
            "pgd": ". ",
            "autoattack_lite": f"; APGD-CE then APGD-T ({ecfg.apgd_targets} targets) with {ecfg.apgd_steps} steps each, on the samples still robust. ",
            "autoattack": f"; AutoAttack: APGD-CE, APGD-T ({ecfg.apgd_targets} targets, {ecfg.apgd_steps} steps), FAB-T ({ecfg.fab_steps} steps), "
            f"Square ({ecfg.square_queries} queries), each on the samples still robust (columns: robust after each). ",
        }[ecfg.attack]
        + "Each accuracy ± one binomial standard error.",
        "",
    ] + _accuracy_table(results, labels, header)
    held_out = summary.get(HELD_OUT)
    if held_out:
        lines += [
            "",
            f"Held-out generated split: {held_out['size']} images drawn from the pool's generator with a seed disjoint "
            "from the pool's, never trained on. They are samples of the generator, not real data: this table is "
            "beside the test split's, not instead of it. Same attacks.",
            "",
        ] + _accuracy_table(held_out["results"], labels, header)
    return "\n".join(lines) + "\n"


def weights_to_evaluate(
    workdir: str, trained_state=None, given: dict | None = None, wanted: tuple[str, ...] = WEIGHTS
) -> tuple[dict, dict]:
    """({name: variables}, {'checkpoint_step', 'best_validation_step'}) of what the phase evaluates: the `given`
    variables (eval.init_from), or those of `wanted` (eval.weights) among the final raw and EMA weights (of
    `trained_state`, or of the work directory's last checkpoint) and the EMA weights of the best-validation
    checkpoint, which is restored only when wanted."""
    if given is not None:
        return {"given": given}, {"checkpoint_step": None, "best_validation_step": None}
    if trained_state is None:
        _, state, step = saved_state(workdir)  # restored once for both sets of weights
        candidates = {
            name: {"params": state[key], "batch_stats": state["batch_stats"]}
            for name, key in (("raw", "params"), ("ema", "ema_params"))
        }
    else:
        candidates, step = (
            {"raw": trained_state.variables(), "ema": trained_state.variables(ema=True)},
            int(trained_state.step),
        )
    candidates = {name: v for name, v in candidates.items() if name in wanted}
    best_state, best_step = None, None
    if "best_ema" in wanted and trained_state is not None:
        best_state, best_step = best_validation_state(workdir, trained_state)
    if best_state is not None:
        candidates["best_ema"] = best_state.variables(ema=True)
    elif (
        "best_ema" in wanted
        and trained_state is None
        and storage.isdir(best_checkpoint_dir(final_checkpoint_dir(workdir)))
    ):
        _, candidates["best_ema"], best_step = saved_variables(workdir, "best_ema")
    return candidates, {"checkpoint_step": step, "best_validation_step": best_step}


def run(config, workdir: str, data: Data, mesh, candidates: dict, steps: dict) -> None:
    """Evaluates each set of `candidates` variables ({name: variables}, from `weights_to_evaluate`); writes results.json
    and report.md, and the metrics to TensorBoard."""
    if run_dir.is_complete(workdir, NAME):
        log.info("[evaluate] complete, skipped (%s)", run_dir.results_file(workdir))
        return
    if not candidates:  # eval.weights asked only for a best-validation checkpoint that was never written
        wanted = tuple(config.eval.get("weights", WEIGHTS))
        raise UserError(
            f"eval.weights={wanted!r}: none of these weights exists in {workdir} (no best-validation checkpoint "
            "without train.validation_size > 0)"
        )
    run_dir.record_settings(workdir, NAME, settings(config))
    start = time.perf_counter()
    results, held_out = evaluate_weights(config, data, mesh, build_model(config), candidates, workdir)
    selection_path = run_dir.selection_file(workdir, "meta.json")
    selection = (
        storage.read_json(selection_path) if storage.exists(selection_path) and "given" not in candidates else None
    )
    timings = storage.read_json(run_dir.timings_file(workdir)) if storage.exists(run_dir.timings_file(workdir)) else {}
    summary = {
        "strategy": config.pruning.strategy if selection else None,
        "keep_ratio": config.pruning.keep_ratio if selection else None,
        "kept": selection["kept"] if selection else None,
        "pool_size": selection["pool_size"] if selection else None,
        "init_from": config.eval.init_from or None,
        "attack": {
            "norm": config.attack.norm,
            "eps": config.attack.eps,
            "pgd_steps": config.eval.pgd_steps,
            "robust_evaluation": config.eval.attack,
        },
        **steps,
        "test_size": len(data.test_labels),
        "seed": config.seed,
        "code": provenance.code_version(),
        "devices": provenance.device_summary(mesh),
        "wall_seconds": timings | {NAME: round(time.perf_counter() - start, 3)},
        "results": results,
    }
    if held_out is not None:
        summary[HELD_OUT] = {
            "size": len(data.held_out_labels),
            "what": "drawn from the pool's generator with a disjoint seed, never trained on; not real data",
            "results": held_out,
        }
    storage.write_text(run_dir.report_file(workdir), report(config, workdir, summary, selection))
    storage.write_json(run_dir.results_file(workdir), summary)
    _to_tensorboard(config, workdir, results, held_out)


def _to_tensorboard(config, workdir: str, results: dict, held_out: dict | None = None) -> None:
    """The run's hyperparameters and test accuracies as a TensorBoard hparams entry (tensorboard/evaluate)."""
    if not storage.is_writer():
        return
    from jax_advprune.metrics import summary_writer

    flat = run_dir.flatten(config.to_dict())
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
    metrics = {
        f"{split}/{weights}/{k}": v
        for split, split_results in (("test", results), (HELD_OUT, held_out or {}))
        for weights, r in split_results.items()
        for k, v in r.items()
        if not k.endswith("_se")
    }
    with summary_writer(run_dir.tensorboard_dir(workdir, NAME)) as writer:
        writer.add_hparams(hparams, metrics, name="hparams")
