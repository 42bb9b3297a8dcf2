"""The work directory: atomic writes by process 0, the settings guard, the run lock, input fingerprints.

Every file a run writes goes through `atomic_output` (a temporary name, then a
rename), so a run cut off at any point leaves either the old file or the new
one. In a multi-host run only process 0 writes (`is_writer`); every process computes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import numpy as np

from jax_advprune import storage
from jax_advprune.errors import UserError
from jax_advprune.storage import atomic_output

log = logging.getLogger("jax_advprune")


def is_writer() -> bool:
    """Process 0 writes logs, metrics and files; every process computes."""
    import jax  # here, so that data readers (grain workers) import this module without jax

    return jax.process_index() == 0


# --------------------------------------------------------------------------- atomic writes


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def to_json_types(obj):
    """`obj` with numpy scalars and arrays turned into plain JSON types (what reading the JSON back gives)."""
    return json.loads(json.dumps(obj, default=_jsonable))


def write_json(path: str, obj) -> None:
    """Writes JSON atomically; only process 0 writes."""
    if is_writer():
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically; only process 0 writes."""
    if is_writer():
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            f.write(text)


def save_npy(path: str, array: np.ndarray) -> None:
    """Saves an .npy atomically; only process 0 writes."""
    if is_writer():
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Saves an uncompressed .npz atomically; only process 0 writes."""
    if is_writer():
        with atomic_output(path, ".npz") as tmp:
            np.savez(tmp, **arrays)


def read_json(path: str):
    return json.loads(storage.read_text(path))


# --------------------------------------------------------------------------- settings guard


class SettingsMismatchError(UserError):
    """The work directory holds outputs of a phase made with other settings."""


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_path(workdir: str, phase: str) -> str:
    return os.path.join(workdir, "settings", f"{phase}.json")


def settings_differences(workdir: str, phase: str, settings: dict) -> list[str]:
    """'key: old -> new' for every setting of `phase` that differs from the recorded one ([] when none is recorded)."""
    path = settings_path(workdir, phase)
    if not storage.exists(path):
        return []
    old, new = flatten(read_json(path)), flatten(to_json_types(settings))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_settings(workdir: str, phase: str, settings: dict, has_outputs: bool) -> None:
    """Raises SettingsMismatchError naming every differing key when `phase` left outputs made with other settings.

    A phase that left no outputs (it failed before writing any) may be rerun with other settings.
    """
    diffs = settings_differences(workdir, phase, settings)
    if diffs and has_outputs:
        raise SettingsMismatchError(
            f"{workdir} already holds '{phase}' outputs made with other settings ({settings_path(workdir, phase)}):\n  "
            + "\n  ".join(diffs)
            + "\nFix: use a new --workdir, or rerun with the recorded settings (nothing is overwritten)."
        )


def record_settings(workdir: str, phase: str, settings: dict) -> None:
    """Records the settings of `phase` when it starts (replacing a record its outputs do not depend on)."""
    if settings_differences(workdir, phase, settings) or not storage.exists(settings_path(workdir, phase)):
        write_json(settings_path(workdir, phase), settings)


# --------------------------------------------------------------------------- input fingerprints


FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_BYTES = 4096


def fingerprint(path: str) -> str:
    """'size:blake2b' of a file: its size and a hash of FINGERPRINT_BLOCKS blocks of 4 KiB at evenly spaced offsets
    (first and last included): 256 KiB read whatever the size, so a 50 GB pool costs milliseconds.

    Detects a file replaced by another of the same name (a regenerated pool differs
    everywhere); an edit of a few bytes between the sampled blocks goes unnoticed.
    """
    size = storage.getsize(path)
    digest = hashlib.blake2b(digest_size=16)
    span = max(size - FINGERPRINT_BLOCK_BYTES, 0)
    offsets = sorted({int(round(i * span / (FINGERPRINT_BLOCKS - 1))) for i in range(FINGERPRINT_BLOCKS)})
    for block in storage.read_blocks(path, offsets, FINGERPRINT_BLOCK_BYTES):
        digest.update(block)
    return f"{size}:{digest.hexdigest()}"


class InputChangedError(UserError):
    """An input file differs from the one the work directory's outputs were made from."""


def inputs_path(workdir: str) -> str:
    return os.path.join(workdir, "settings", "inputs.json")


def check_inputs(workdir: str, paths: list[str]) -> dict[str, str]:
    """Fingerprints of `paths`; raises InputChangedError naming each file that differs from the recorded fingerprint.

    Paths the record does not hold are not compared (they are recorded by `record_inputs`).
    """
    current = {storage.absolute(p): fingerprint(p) for p in paths}
    if storage.exists(inputs_path(workdir)):
        recorded = read_json(inputs_path(workdir))
        changed = [p for p, fp in current.items() if p in recorded and recorded[p] != fp]
        if changed:
            raise InputChangedError(
                f"{len(changed)} input file(s) changed since this work directory's outputs were made from them "
                f"(size and sampled content differ from {inputs_path(workdir)}):\n  " + "\n  ".join(changed)
                + "\nFix: restore the original files, or use a new --workdir for the new data."
            )
    return current


def record_inputs(workdir: str, fingerprints: dict[str, str]) -> None:
    """Adds `fingerprints` to the record (first seen wins: a recorded file is never re-recorded)."""
    recorded = read_json(inputs_path(workdir)) if storage.exists(inputs_path(workdir)) else {}
    merged = {**fingerprints, **recorded}
    if merged != recorded:
        write_json(inputs_path(workdir), merged)


# --------------------------------------------------------------------------- one run per work directory


class WorkdirLockedError(UserError):
    """Another live run holds the work directory."""


LOCK_NAME = "lock"


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
        self.path = os.path.join(workdir, LOCK_NAME)
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
            raise WorkdirLockedError(self._refusal(holder) + " (on another host: if that run is gone, delete the lock file)")
        if holder:  # we hold the flock, so its writer died without releasing it
            log.info("taking over %s left by process %s on %s, no longer running (started %s)", self.path, holder.get("pid"), host, holder.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
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
        who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"
        return f"{os.path.dirname(self.path)} is in use by another run: {who} holds {self.path}. Wait for it, or stop it, or use another --workdir"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # the flock goes with the descriptor; the empty file stays (removing it would race a new holder)
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
        self.path = workdir.rstrip("/") + "/" + LOCK_NAME
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
            where = "this host, still running" if holder.get("host") == socket.gethostname() else \
                f"another host, last heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago; taken over after {self.stale_after_s:.0f} s without one"
            raise WorkdirLockedError(f"{self.path.rsplit('/', 1)[0]} is in use by another run: process {holder.get('pid', '?')} on host "
                                     f"{holder.get('host', '?')} (started {holder.get('started', '?')}; {where}) holds {self.path}. "
                                     "Wait for it, or stop it, or use another --workdir")
        if holder:
            log.info("taking over %s left by process %s on %s, no longer running (started %s)", self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start_ticks(os.getpid()),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        try:
            self._write("overwrite" if holder else "create")
        except FileExistsError:  # another run created it between our read and our write
            raise WorkdirLockedError(f"{self.path} was just created by another run: {self._holder()}; use another --workdir") from None
        if self._holder().get("token") != self._record["token"]:
            raise WorkdirLockedError(f"{self.path} was just taken by another run: {self._holder()}; use another --workdir")
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), name="lock-heartbeat", daemon=True).start()

    def _beat(self, stop) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                if self._holder().get("token") != self._record["token"]:
                    log.warning("%s is no longer ours (another run took it over); this run goes on without it", self.path)
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


# --------------------------------------------------------------------------- phase wall times


def timings_path(workdir: str) -> str:
    return os.path.join(workdir, "timings.json")


def add_phase_seconds(workdir: str, phase: str, seconds: float) -> None:
    """Adds `seconds` of wall time to `phase`'s total in timings.json (summed over the runs that resumed it)."""
    totals = read_json(timings_path(workdir)) if storage.exists(timings_path(workdir)) else {}
    totals[phase] = round(totals.get(phase, 0.0) + seconds, 3)
    write_json(timings_path(workdir), totals)
