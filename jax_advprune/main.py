"""Command line: python -m jax_advprune.main --config configs/<x>.py[:variant] --workdir <dir> [--config.a.b=v ...]

Order: flags -> devices and multi-host start -> every setting and input checked
(nothing written) -> the work directory locked (process 0) -> the phases. A
user's mistake prints one message and exits with status 2; `--verbose` adds the
traceback. A SIGTERM (preemption) makes every process save at the same step and
exit with status 143; rerunning the command resumes. The log goes to stdout and to <workdir>/run.log.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml-collections config file, optionally ':variant'."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory holding every phase's outputs; rerunning resumes.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Virtual XLA:CPU devices to split batches over when running on a CPU; 0 = two per core."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-host: 'auto' calls jax.distributed.initialize when JAX_COORDINATOR_ADDRESS or JAX_NUM_PROCESSES "
    "is set (with JAX_PROCESS_ID), 'on' always (SLURM, Open MPI, Cloud TPU and Kubernetes are detected), 'off' never.",
)
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Show the traceback of a user error (a bad setting or input) too.")
_PHASES = flags.DEFINE_list(
    "phases",
    "score,select,train,evaluate",
    "The phases to run, an ordered subset of score,select,train,evaluate (e.g. score,select; or evaluate with "
    "--config.eval.init_from=PATH to evaluate any checkpoint). A phase whose outputs are complete is skipped anyway.",
)
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("jax_advprune")
EXIT_USER_ERROR = 2


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


class ObjectLogHandler(logging.Handler):
    """The run log in an object store (which has no appends): rewritten every `upload_every_s` seconds and at the
    end (a run killed with -9 loses the last seconds' lines there; stdout has them)."""

    def __init__(self, path: str, upload_every_s: float = 30.0):
        super().__init__()
        from jax_advprune import storage

        self._file = storage.TextAppender(path, upload_every_s)

    def emit(self, record: logging.LogRecord) -> None:
        self._file.append(self.format(record) + "\n")

    def flush(self) -> None:
        try:
            self._file.flush()
        except Exception as error:  # the log must never stop a run
            print(f"warning: could not write the run log {self._file.path}: {error}", file=sys.stderr)

    def close(self) -> None:
        self.flush()
        super().close()


def log_to_file(path: str) -> logging.Handler:
    """Appends this package's log to `path` as well (process 0's run log), a local file or an object."""
    from jax_advprune import storage

    handler = ObjectLogHandler(path) if storage.is_remote(path) else logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    return handler


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a config override that names no setting reported as one line (not a traceback)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit(f"{error}\nPass --helpshort to see the flags.")
    except (AttributeError, KeyError, ValueError, TypeError) as error:
        if "--verbose" in argv:
            raise
        overrides = [a for a in argv if a.startswith("--config.")]
        _exit(
            f"cannot apply the config or its overrides {overrides}: {type(error).__name__}: {str(error).strip(chr(34))}\n"
            "Check each key against the config file (every key must already exist there) and the value's type."
        )


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(config, workdir: str, phases: tuple[str, ...] = ("score", "select", "train", "evaluate")) -> None:
    """Checks everything, locks the work directory and runs the pipeline's `phases`."""
    import jax

    from jax_advprune import parallel, pipeline, preemption, provenance, run_dir, run_lock, storage, validate
    from jax_advprune.models import layers

    platform, available = jax.devices()[0].platform, len(jax.devices())
    validate.check_run(
        config,
        workdir,
        available_devices=available,
        process_count=jax.process_count(),
        platform=platform,
        phases=tuple(phases),
    )
    mesh = parallel.make_mesh(
        validate.mesh_size(config, available, process_count=jax.process_count(), platform=platform)
    )
    lock = run_lock.run_lock(workdir)
    locked = None
    if storage.is_writer():
        try:
            lock.acquire()
        except run_lock.WorkdirLockedError as error:
            locked = error
    parallel.agree_or_raise(locked, run_lock.WorkdirLockedError(f"process 0 could not lock {workdir}"))
    handler = log_to_file(run_dir.log_file(workdir)) if storage.is_writer() else None
    try:
        log.info(
            "jax_advprune %s; devices: %d x %s %s (process %d of %d)",
            provenance.code_version(),
            mesh.size,
            mesh.devices.flat[0].platform,
            mesh.devices.flat[0].device_kind,
            jax.process_index(),
            jax.process_count(),
        )
        if mesh.size < available:
            sizes = ", ".join(f"{k} {v}" for k, v in validate.split_sizes(config).items())
            log.info(
                "the mesh spans %d of the %d %s devices: the largest count that divides every size split over it (%s); "
                "set num_devices, or sizes that divide, to use more",
                mesh.size,
                available,
                platform,
                sizes,
            )
        log.info("convolutions: %s", layers.choose_convolutions(config.model.name))
        preemption.install()
        pipeline.run(config, workdir, mesh, tuple(phases))
    except preemption.Preempted as error:
        log.info("%s", error)
        raise
    except Exception as error:
        log.error("stopped: %s: %s", type(error).__name__, error)
        raise
    finally:
        preemption.uninstall()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        lock.release()


def main(argv) -> None:
    from jax_advprune.errors import UserError
    from jax_advprune.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS
    from jax_advprune.preemption import Preempted

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    from jax_advprune import parallel

    distributed = False
    try:
        parallel.use_cpu_devices(_CPU_DEVICES.value)  # before jax starts its backends
        distributed = parallel.initialize_distributed(_DISTRIBUTED.value)
        run(_CONFIG.value, _WORKDIR.value, tuple(_PHASES.value))
    except Preempted:
        sys.exit(PREEMPTED_EXIT_STATUS)  # the log said where it saved
    except UserError as error:  # raised on every process alike (parallel.agree_or_raise)
        if _VERBOSE.value:
            raise
        _exit(str(error))
    except BaseException:
        if not distributed:
            raise
        # One process of a multi-host run failed (often because another died: its collectives fail at once).
        # Exiting normally would wait in JAX's shutdown barrier for the heartbeat timeout of a process that is gone.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
