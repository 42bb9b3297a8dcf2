"""Command line: python -m jax_advprune.main --config configs/<x>.py[:variant] --workdir <dir> [--config.a.b=v ...]"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file, optionally ':variant'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory holding every phase's outputs; rerunning resumes.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Virtual XLA:CPU devices to split batches over when running on a CPU; 0 = two per core."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host: 'auto' calls jax.distributed.initialize when JAX_COORDINATOR_ADDRESS or JAX_NUM_PROCESSES "
    "is set (with JAX_PROCESS_ID), 'on' always (SLURM, Open MPI, Cloud TPU and Kubernetes are detected), 'off' never.",
)
flags.mark_flags_as_required(["config", "workdir"])


def setup_logging() -> None:
    """Progress lines of this package on stdout; other libraries' INFO chatter muted."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("jax_advprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    from jax_advprune import parallel, pipeline

    parallel.use_cpu_devices(_CPU_DEVICES.value)  # before jax starts its backends
    parallel.initialize_distributed(_DISTRIBUTED.value)

    pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
