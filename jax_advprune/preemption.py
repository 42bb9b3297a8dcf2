"""Preemption: a SIGTERM (what Cloud TPU, spot VMs, SLURM and Kubernetes send before they evict a job)
makes every process of a run save at the same point and stop; rerunning the command resumes there.

`stop_requested()` is called by every process at the same points of the run (after
every training step, after every saved chunk of resumable work). It returns
False until a notice arrives and then True on every process at the same call:
in a multi-host run JAX's preemption sync manager (which catches SIGTERM on each
host) agrees on that call across processes; in a single-process run a SIGTERM
handler installed by `install()` sets a flag. The caller saves its state and
raises `Preempted`; the command exits with status 143 (128 + SIGTERM).
"""

from __future__ import annotations

import signal
import threading

EXIT_STATUS = 128 + signal.SIGTERM

_notice = threading.Event()
_calls = 0  # one counter across the whole run, so the sync points of successive training runs never repeat
_previous_handler = None  # what `install` replaced


class Preempted(Exception):
    """A preemption notice (SIGTERM) arrived; the run saved its state and stopped. Rerun the same command to resume."""


def _uses_sync_manager() -> bool:
    """Whether JAX's preemption sync manager runs (jax.distributed started, with its preemption service on)."""
    import jax

    return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


def install() -> None:
    """Catches SIGTERM in a single-process run (a multi-host run's sync manager catches it already). Main thread only."""
    global _previous_handler
    _notice.clear()
    if not _uses_sync_manager():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _notice.set())
        _previous_handler = signal.SIG_DFL if previous is None else previous  # None: set outside Python


def uninstall() -> None:
    """Puts back the SIGTERM handler `install` replaced, and forgets a notice."""
    global _previous_handler
    if _previous_handler is not None:
        signal.signal(signal.SIGTERM, _previous_handler)
        _previous_handler = None
    _notice.clear()


def stop_requested() -> bool:
    """True, on every process at the same call, once a preemption notice has reached any of them.

    Every process must make the same sequence of calls (JAX's sync manager counts them).
    """
    global _calls
    _calls += 1
    if _uses_sync_manager():
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(_calls))
    return _notice.is_set()
