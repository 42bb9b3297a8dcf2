"""One run per work directory: a lock held by process 0 for the whole run (flock on a file system, a create-only
object with a heartbeat in an object store), taken over when its holder died."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from jax_advprune import run_dir, storage
from jax_advprune.errors import UserError

log = logging.getLogger("jax_advprune")


class WorkdirLockedError(UserError):
    """Another live run holds the work directory."""


class RunLock:
    """An exclusive lock on a work directory, held for the whole run by process 0.

    `<workdir>/lock` holds the holder's host, pid and start time and is locked with
    flock, which the kernel drops when the process dies. A second run is refused
    with the holder's host and pid. A lock file left by a process on this host
    that died without releasing it (kill -9) is taken over, with a log line; one
    naming another host is refused (its liveness cannot be checked from here:
    delete the file once that run is gone).
    """

    def __init__(self, workdir: str):
        self.path = run_dir.lock_file(workdir)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise WorkdirLockedError(self._refusal(self._holder())) from None
            # The file may have been removed (and recreated) by its previous holder since we opened it.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._holder(fd)
        if holder and holder.get("host") != host:
            os.close(fd)
            raise WorkdirLockedError(
                self._refusal(holder) + " (on another host: if that run is gone, delete the lock file)"
            )
        if holder:  # we hold the flock, so its writer died without releasing it
            log.info(
                "taking over %s left by process %s on %s, no longer running (started %s)",
                self.path,
                holder.get("pid"),
                host,
                holder.get("started"),
            )
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps({"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(),
            0,
        )
        os.fsync(fd)
        self._fd = fd

    def _holder(self, fd: int | None = None) -> dict:
        try:
            if fd is None:
                with open(self.path) as f:
                    text = f.read()
            else:
                text = os.pread(fd, 4096, 0).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def _refusal(self, holder: dict) -> str:
        who = (
            f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"
        )
        return f"{os.path.dirname(self.path)} is in use by another run: {who} holds {self.path}. Wait for it, or stop it, or use another --workdir"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(
                self._fd
            )  # the flock goes with the descriptor; the empty file stays (removing it would race a new holder)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class ObjectRunLock:
    """The run lock of a work directory in an object store (gs://), held for the whole run by process 0.

    An object store has no flock. `<workdir>/lock` is created only if absent (GCS's
    ifGenerationMatch=0 precondition, through gcsfs's mode="create"), holds the
    holder's host, pid, a random token and a heartbeat time rewritten every
    `heartbeat_s`, and is deleted on release. A second run finds it and is refused
    while its holder lives: on this host while the pid runs; on another host while
    the heartbeat is younger than `stale_after_s`. A lock left behind (kill -9,
    a lost host) is taken over after that, with a log line.
    """

    def __init__(self, workdir: str, heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
        self.path = run_dir.lock_file(workdir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._record: dict | None = None
        self._stop = None

    def _holder(self) -> dict:
        try:
            return json.loads(storage.read_text(self.path) or "{}")
        except (FileNotFoundError, ValueError):
            return {}

    def _write(self, mode: str) -> None:
        self._record["heartbeat"] = time.time()
        storage.filesystem(self.path).pipe_file(self.path, json.dumps(self._record).encode(), mode=mode)

    def holder_is_live(self, holder: dict) -> bool:
        """Whether the run named in the lock object may still be running (see the class docstring)."""
        if holder.get("host") == socket.gethostname():
            return process_is_running(int(holder.get("pid", -1)), holder.get("pid_started"))
        return time.time() - float(holder.get("heartbeat", 0)) < self.stale_after_s

    def acquire(self) -> None:
        holder = self._holder()
        if holder and self.holder_is_live(holder):
            where = (
                "this host, still running"
                if holder.get("host") == socket.gethostname()
                else f"another host, last heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago; taken over after {self.stale_after_s:.0f} s without one"
            )
            raise WorkdirLockedError(
                f"{self.path.rsplit('/', 1)[0]} is in use by another run: process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (started {holder.get('started', '?')}; {where}) holds {self.path}. "
                "Wait for it, or stop it, or use another --workdir"
            )
        if holder:
            log.info(
                "taking over %s left by process %s on %s, no longer running (started %s)",
                self.path,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started"),
            )
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": process_start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex,
        }
        try:
            self._write("overwrite" if holder else "create")
        except FileExistsError:  # another run created it between our read and our write
            raise WorkdirLockedError(
                f"{self.path} was just created by another run: {self._holder()}; use another --workdir"
            ) from None
        if self._holder().get("token") != self._record["token"]:
            raise WorkdirLockedError(
                f"{self.path} was just taken by another run: {self._holder()}; use another --workdir"
            )
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), name="lock-heartbeat", daemon=True).start()

    def _beat(self, stop) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                if self._holder().get("token") != self._record["token"]:
                    log.warning(
                        "%s is no longer ours (another run took it over); this run goes on without it", self.path
                    )
                    return
                self._write("overwrite")
            except Exception as error:  # a failed heartbeat must not stop training; the next one retries
                log.warning("lock heartbeat of %s failed: %s", self.path, error)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            if self._holder().get("token") == self._record["token"]:
                storage.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc), or None where unknown: with the
    pid it tells a live process from a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_is_running(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` of this host runs (and, when `started` is known, is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or process_start_ticks(pid) in (None, started)


def run_lock(workdir: str):
    """The run lock of `workdir`: flock on a local or shared file system, `ObjectRunLock` in an object store."""
    return ObjectRunLock(workdir) if storage.is_remote(workdir) else RunLock(workdir)
