"""A run: its checks, then the four phases in order, score -> select -> train -> evaluate.

Each phase reads its inputs from and writes its outputs to the work directory,
is skipped when its outputs are complete and resumes when they are not (see
jax_advprune/phases). Outputs are written atomically, by process 0.
"""

from __future__ import annotations

import logging
import time

from jax_advprune import parallel, validate
from jax_advprune import workdir as workdir_lib
from jax_advprune.data.splits import load_data
from jax_advprune.phases import evaluate, score, select, train

log = logging.getLogger("jax_advprune")

PHASES = (score, select, train, evaluate)


def run(config, workdir: str, mesh) -> None:
    """Runs every phase whose outputs are missing; `validate.check_run` must have passed."""
    data = load_data(config, workdir)
    workdir_lib.record_inputs(workdir, workdir_lib.check_inputs(workdir, data.files))

    def timed(phase, *args):
        start = time.perf_counter()
        result = phase.run(config, workdir, *args)
        parallel.sync(f"{phase.NAME} written")
        workdir_lib.add_phase_seconds(workdir, phase.NAME, time.perf_counter() - start)
        return result

    timed(score, data, mesh)
    timed(select, data)
    model, state = timed(train, data, mesh)
    timed(evaluate, data, mesh, model, state)
    log.info("done: %s", workdir + "/report.md")
