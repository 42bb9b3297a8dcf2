"""A run: the four phases in order, score -> select -> train -> evaluate, or an ordered subset of them.

Each phase reads its inputs from and writes its outputs to the work directory,
is skipped when its outputs are complete and resumes when they are not (see
jax_advprune/phases). Outputs are written atomically, by process 0. Weights
named by scoring.init_from, train.init_from and eval.init_from are loaded first.
"""

from __future__ import annotations

import logging
import time

from jax_advprune import parallel, preemption, run_dir
from jax_advprune.data.splits import input_files, load_data
from jax_advprune.phases import evaluate, score, select, train, weights

log = logging.getLogger("jax_advprune")

PHASES = ("score", "select", "train", "evaluate")


def run(config, workdir: str, mesh, phases: tuple[str, ...] = PHASES) -> None:
    """Runs the `phases` (an ordered subset of PHASES) whose outputs are missing; `validate.check_run` must have passed."""
    data = load_data(config, run_dir.data_dir(workdir))
    files = list(dict.fromkeys(data.files + input_files(config)))  # data and checkpoint files
    run_dir.record_inputs(workdir, run_dir.check_inputs(workdir, files))
    given = {
        key: weights.load_variables(config[key].init_from, config, data.pool.image_shape)
        for key in ("scoring", "train", "eval")
        if config[key].init_from
    }

    def timed(phase, *args):
        start = time.perf_counter()
        try:
            result = phase.run(config, workdir, *args)
        except preemption.Preempted:
            run_dir.add_phase_seconds(workdir, phase.NAME, time.perf_counter() - start)  # the work it saved
            raise
        parallel.sync(f"{phase.NAME} written")
        run_dir.add_phase_seconds(workdir, phase.NAME, time.perf_counter() - start)
        return result

    if "score" in phases:
        timed(score, data, mesh, given.get("scoring"))
    if "select" in phases:
        timed(select, data)
    trained = timed(train, data, mesh, given.get("train"))[1] if "train" in phases else None
    if "evaluate" in phases:
        wanted = tuple(config.eval.get("weights", evaluate.WEIGHTS))
        timed(evaluate, data, mesh, *evaluate.weights_to_evaluate(workdir, trained, given.get("eval"), wanted))
    log.info("done (%s): %s", ", ".join(phases), workdir)
