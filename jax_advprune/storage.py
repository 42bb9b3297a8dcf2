"""Files of a work directory and of the data, on a local disk or in an object store (gs://, any fsspec URL).

The functions take a path or a URL and do the same thing on both: `exists`,
`isdir`, `listdir`, `open_file`, `load_npy`. Writes go through `atomic_output`:
locally a temporary name beside the file, then a rename; in an object store a
local scratch file, then one upload (an object appears whole or not at all).
An object store has no directories and no appends: `makedirs` does nothing
there and `TextAppender` rewrites the object. In a multi-host run only process 0
writes (`is_writer`: `write_json`, `write_text`, `save_npy`, `save_npz`); every
process computes.

Remote filesystems come from fsspec (gcsfs for gs://, the `[gcs]` extra), one
per protocol and process, without a listings cache: another process (or orbax,
through tensorstore) may have written since the last listing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np


def is_remote(path: str) -> bool:
    """True for a URL with a scheme other than file:// (gs://bucket/pool.npz)."""
    return "://" in str(path) and not str(path).startswith("file://")


@functools.cache
def _filesystem(protocol: str):
    import fsspec

    from jax_advprune.errors import UserError

    try:
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except (ImportError, ValueError) as error:  # its package is not installed; a protocol fsspec does not know
        raise UserError(
            f"{protocol}:// paths need an fsspec filesystem for {protocol}:// ({error}); for gs:// "
            "install the [gcs] extra: pip install -e '.[gcs]'"
        ) from None


def filesystem(path: str):
    """The fsspec filesystem of a remote `path` (gcsfs for gs://)."""
    return _filesystem(path.split("://", 1)[0])


def clear_filesystems() -> None:
    """Forgets the filesystems made so far (after their configuration changed, e.g. in tests)."""
    _filesystem.cache_clear()


# A forked child (a grain worker) cannot use its parent's filesystems: their sessions live on the parent's
# event-loop thread, which the child does not have. It makes its own.
os.register_at_fork(after_in_child=clear_filesystems)


def absolute(path: str) -> str:
    """An absolute local path; a URL unchanged (with no trailing slash)."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return filesystem(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """A local directory, or a prefix under which objects exist."""
    return filesystem(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return filesystem(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def getsize(path: str) -> int:
    """Bytes in the file."""
    return int(filesystem(path).size(path)) if is_remote(path) else os.path.getsize(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a directory or prefix; [] for a missing directory or a prefix without objects."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs = filesystem(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({os.path.basename(entry.rstrip("/")) for entry in entries} - {""})


def makedirs(path: str) -> None:
    """Creates a local directory and its parents (an object store needs none)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Removes a file or object; nothing when it does not exist."""
    try:
        filesystem(path).rm_file(path) if is_remote(path) else os.remove(path)
    except FileNotFoundError:
        pass


def open_file(path: str, mode: str = "r"):
    """A file object for reading ('r', 'rb'); remote ones are seekable and read in blocks."""
    if "r" not in mode or "+" in mode:
        raise ValueError(f"open_file reads only (mode {mode!r}); write through atomic_output")
    return filesystem(path).open(path, mode) if is_remote(path) else open(path, mode)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return filesystem(path).cat_file(path)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_blocks(path: str, offsets: list[int], block_bytes: int) -> list[bytes]:
    """The `block_bytes` bytes at each offset (fewer at the end of the file); one concurrent batch remotely."""
    if is_remote(path):
        return filesystem(path).cat_ranges([path] * len(offsets), list(offsets), [o + block_bytes for o in offsets])
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, block_bytes, offset) for offset in offsets]
    finally:
        os.close(fd)


def load_npy(path: str) -> np.ndarray:
    """An .npy file read whole into memory."""
    return np.load(io.BytesIO(read_bytes(path))) if is_remote(path) else np.load(path)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read into memory."""
    with np.load(io.BytesIO(read_bytes(path)) if is_remote(path) else path) as saved:
        return {name: saved[name] for name in saved.files}


@contextlib.contextmanager
def scratch_file(path: str, suffix: str = ""):
    """Yields a local path to fill for `path` and removes it afterwards: beside `path` when local (the same
    disk, so it can be renamed into place), in the system's temporary directory (TMPDIR) when remote."""
    if is_remote(path):
        directory = tempfile.mkdtemp(prefix="jax_advprune_")
        try:
            yield os.path.join(directory, os.path.basename(path) + suffix)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = ""):
    """Yields a local temporary path; on success it becomes `path` (renamed, or uploaded as one object), on
    error it is removed and `path` is untouched.

    `suffix` is kept at the end of the temporary name (np.savez appends '.npz' otherwise).
    """
    with scratch_file(path, suffix) as tmp:
        yield tmp
        if is_remote(path):
            filesystem(path).put_file(tmp, path)
        else:
            os.replace(tmp, path)


class TextAppender:
    """Appends to a text file (a run log, JSON-lines metrics). Locally each `append` appends to the file. An object
    has no appends: its text (the existing object's, then what is appended) is kept in memory and the object
    rewritten whole, at most every `upload_every_s` seconds and on `flush` (what is newer is lost to a kill -9)."""

    def __init__(self, path: str, upload_every_s: float = 0.0):
        self.path, self.upload_every_s = path, upload_every_s
        self._text = None
        if is_remote(path):
            self._text = read_text(path) if exists(path) else ""
        self._uploaded_at = float("-inf")

    def append(self, text: str) -> None:
        if self._text is None:
            with open(self.path, "a") as f:
                f.write(text)
            return
        self._text += text
        if time.monotonic() - self._uploaded_at >= self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        if self._text is not None:
            filesystem(self.path).pipe_file(self.path, self._text.encode())
            self._uploaded_at = time.monotonic()


def local_copy(path: str, cache_dir: str, log=None) -> str:
    """A local copy of remote file `path` in `cache_dir`, downloaded once per host and reused while the remote
    file keeps its size (processes sharing the directory wait for one download, under flock); a local
    `path` is returned unchanged.

    The copy is named <12 hex digits of the URL's SHA-1>_<file name>, so equal names in different buckets
    do not collide.
    """
    if not is_remote(path):
        return path
    import fcntl
    import hashlib

    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, f"{hashlib.sha1(path.encode()).hexdigest()[:12]}_{os.path.basename(path)}")
    remote_bytes = getsize(path)
    with open(local + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if os.path.exists(local) and os.path.getsize(local) == remote_bytes:
            return local
        start = time.perf_counter()
        with atomic_output(local) as tmp:
            filesystem(path).get_file(path, tmp)
            if os.path.getsize(tmp) != remote_bytes:
                raise OSError(f"copying {path} to {local}: got {os.path.getsize(tmp)} of {remote_bytes} bytes")
        if log is not None:
            seconds = time.perf_counter() - start
            log.info(
                "copied %s (%.1f MB) to %s in %.1f s (%.0f MB/s)",
                path,
                remote_bytes / 1e6,
                local,
                seconds,
                remote_bytes / 1e6 / max(seconds, 1e-9),
            )
    return local


# --------------------------------------------------------------------------- what process 0 writes


def is_writer() -> bool:
    """Process 0 writes logs, metrics and files; every process computes."""
    import jax  # here, so that data readers (grain workers) import this module without jax

    return jax.process_index() == 0


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
    return json.loads(read_text(path))
