"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child is killed (SIGKILL) when the process that started it dies, however it
    dies (kill -9 included), through Linux's PR_SET_PDEATHSIG; elsewhere it does nothing."""
    parent_pid = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return preexec
