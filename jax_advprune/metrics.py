"""Progress lines (bar, images/s, ETA) and metrics as JSON lines and TensorBoard event files."""

from __future__ import annotations

import json
import logging
import time

from jax_advprune import storage
from jax_advprune.storage import atomic_output

log = logging.getLogger("jax_advprune")


def format_duration(seconds: float) -> str:
    """Seconds -> 'H:MM:SS'."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_bar(fraction: float, width: int = 20) -> str:
    """'[#####...............]' for a fraction in [0, 1]."""
    filled = int(round(min(max(fraction, 0.0), 1.0) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def drop_records_after(jsonl_path: str, phase: str, step: int) -> None:
    """Rewrites the JSON-lines file (atomically) without the records of `phase` whose step is > `step`."""
    if not storage.exists(jsonl_path):
        return
    lines = storage.read_text(jsonl_path).splitlines(keepends=True)
    kept = [line for line in lines if not _is_later(line, phase, step)]
    if len(kept) != len(lines):
        with atomic_output(jsonl_path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)


def _is_later(line: str, phase: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True  # a line cut off by a kill
    return record.get("phase") == phase and record.get("step", 0) > step


class Progress:
    """Reports rate and ETA of a loop of `total` steps of `items_per_step` items each.

    `update(step, **metrics)` appends {"phase", "step", metrics..., "items_per_s"}
    (the rate since the previous update) to the JSON-lines file, if any, writes
    the same scalars as `<phase>/<name>` to TensorBoard event files in
    `tensorboard_dir`, if any, and logs a progress line at most every `every_s`
    seconds and always on the last step. Only process 0 of a multi-host run
    should write (the caller passes no paths elsewhere).

    A loop resumed at `first_step` first drops the file's records of its phase
    with a later step (written after the checkpoint it resumed from), so every
    step is recorded once however often a run is resumed.
    """

    def __init__(
        self,
        phase: str,
        total: int,
        items_per_step: int,
        jsonl_path: str | None = None,
        every_s: float = 10.0,
        first_step: int = 0,
        tensorboard_dir: str | None = None,
    ):
        self.phase, self.total, self.items_per_step = phase, total, items_per_step
        self.jsonl_path, self.every_s = jsonl_path, every_s
        self.start_time = self.last_time = self.last_log_time = time.perf_counter()
        self.first_step = self.last_step = first_step
        if jsonl_path:
            drop_records_after(jsonl_path, phase, first_step)
        self._jsonl = storage.TextAppender(jsonl_path) if jsonl_path else None  # in a bucket: rewritten at each record
        self._tensorboard = None
        if tensorboard_dir:
            self._tensorboard = summary_writer(tensorboard_dir, flush_secs=30)

    def log(self, step: int, **metrics) -> None:
        """Records metrics that are not part of the rate (validation results): JSON line, TensorBoard, log line."""
        record = {"phase": self.phase, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self._write(step, record)
        log.info("[%s] step %d: %s", self.phase, step, " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()))

    def _write(self, step: int, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.append(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name not in ("phase", "step"):
                    self._tensorboard.add_scalar(f"{self.phase}/{name}", value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

    def update(self, step: int, force: bool = False, **metrics) -> None:
        """Call after finishing `step` (1-based count of steps done)."""
        now = time.perf_counter()
        done = step - self.first_step
        elapsed = now - self.start_time
        rate = (step - self.last_step) * self.items_per_step / max(now - self.last_time, 1e-9)
        steps_per_s = done / max(elapsed, 1e-9)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        self.last_time, self.last_step = now, step
        record = {"phase": self.phase, "step": step, **{k: float(v) for k, v in metrics.items()}, "items_per_s": rate}
        self._write(step, record)
        if not force and step < self.total and now - self.last_log_time < self.every_s:
            return
        self.last_log_time = now
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        log.info(
            "[%s] %s %d/%d (%.0f%%) %.0f img/s elapsed %s ETA %s %s",
            self.phase,
            progress_bar(step / max(self.total, 1)),
            step,
            self.total,
            100.0 * step / max(self.total, 1),
            rate,
            format_duration(elapsed),
            format_duration(eta),
            shown,
        )


class _ObjectEventFile:
    """A TensorBoard event file in an object store: the records are kept in memory and the object rewritten
    whole on each flush (tensorboardX flushes every `flush_secs` and on close)."""

    def __init__(self, path: str):
        self.path, self.data = path, bytearray()

    def write(self, record: bytes) -> None:
        self.data += record

    def flush(self) -> None:
        storage.filesystem(self.path).pipe_file(self.path, bytes(self.data))

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no directories."""


def summary_writer(directory: str, **kwargs):
    """tensorboardX's SummaryWriter for a local `directory` or one in an object store, which it then writes
    through fsspec (its own gs:// writer needs google-cloud-storage, which the [gcs] extra does not install)."""
    from tensorboardX import SummaryWriter, record_writer

    if storage.is_remote(directory):
        record_writer.register_writer_factory(directory.split("://", 1)[0], _ObjectEventFiles())
    return SummaryWriter(directory, **kwargs)
