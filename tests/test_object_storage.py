"""Files in a bucket (gs://, against a local GCS emulator): the storage functions do what they do on disk, pool
files read the same rows with coalesced ranged reads, a fingerprint does not depend on where the file lies, and
the run lock of a gs:// work directory refuses a second run."""

import json
import logging
import os
import pickle
import socket
import time

import numpy as np
import pytest
from conftest import make_npz

from jax_advprune import run_dir, run_lock, storage
from jax_advprune.data import remote
from jax_advprune.data.sources import open_pool


def test_coalesced_ranges_cover_every_range_and_merge_only_small_gaps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        edges = np.sort(rng.choice(10_000, size=2 * rng.integers(1, 40), replace=False))
        starts, ends = edges[0::2], edges[1::2]
        gap = int(rng.integers(0, 500))
        merged_starts, merged_ends = remote.coalesce(starts, ends, gap)
        which = np.searchsorted(merged_starts, starts, side="right") - 1
        assert np.all(merged_starts[which] <= starts) and np.all(
            ends <= merged_ends[which]
        )  # each range inside one merged range
        assert np.all(merged_starts[1:] - merged_ends[:-1] > gap)  # what stays apart is farther than the gap
        assert len(merged_starts) <= len(starts) and merged_starts[0] == starts[0] and merged_ends[-1] == ends[-1]


def test_a_pool_in_a_bucket_reads_the_rows_and_labels_of_the_same_pool_on_disk(gcs_bucket, tmp_path):
    make_npz(tmp_path / "orig.npz", 60, shape=(8, 8, 3), seed=1)
    make_npz(tmp_path / "syn.npz", 500, shape=(8, 8, 3), seed=2, offset=60)
    fs = storage.filesystem(gcs_bucket)
    for name in ("orig.npz", "syn.npz"):
        fs.put(str(tmp_path / name), f"{gcs_bucket}/pool/{name}")
    local = open_pool(str(tmp_path / "orig.npz"), [str(tmp_path / "syn.npz")], 10)
    in_bucket = open_pool(f"{gcs_bucket}/pool/orig.npz", [f"{gcs_bucket}/pool/syn.npz"], 10)
    assert len(in_bucket) == len(local) == 560 and in_bucket.image_shape == local.image_shape
    np.testing.assert_array_equal(in_bucket.labels(), local.labels())
    rng = np.random.default_rng(3)
    for size in (1, 7, 64, 300):  # scattered rows: some merged into one range, some apart
        rows = np.sort(rng.choice(560, size=size, replace=False))
        for got, expected in zip(in_bucket.read(rows), local.read(rows)):
            np.testing.assert_array_equal(got, expected)
    reopened = pickle.loads(pickle.dumps(in_bucket))  # what grain workers receive
    np.testing.assert_array_equal(reopened.read(np.arange(50, 70))[0], local.read(np.arange(50, 70))[0])


def test_storage_functions_do_in_a_bucket_what_they_do_on_disk(gcs_bucket, tmp_path, caplog):
    for root in (str(tmp_path / "disk"), f"{gcs_bucket}/{tmp_path.name}"):
        storage.makedirs(root)
        with storage.atomic_output(f"{root}/a.npy", ".npy") as tmp:
            np.save(tmp, np.arange(5))
        with pytest.raises(RuntimeError), storage.atomic_output(f"{root}/never.txt") as tmp:
            open(tmp, "w").write("x")
            raise RuntimeError("failed while writing")
        for text in ("one\n", "two\n"):  # appended by one appender, then by another that finds the first's text
            storage.TextAppender(f"{root}/log.txt").append(text)
        assert storage.listdir(root) == ["a.npy", "log.txt"] and not storage.exists(f"{root}/never.txt")
        assert storage.isdir(root) and storage.isfile(f"{root}/a.npy") and not storage.isdir(f"{root}/a.npy")
        assert storage.read_text(f"{root}/log.txt") == "one\ntwo\n" and storage.listdir(f"{root}/nothing") == []
        np.testing.assert_array_equal(storage.load_npy(f"{root}/a.npy"), np.arange(5))
        storage.remove(f"{root}/a.npy")
        storage.remove(f"{root}/a.npy")  # gone already: nothing
        assert storage.listdir(root) == ["log.txt"]

    data = os.urandom(1 << 20)
    (tmp_path / "big").write_bytes(data)
    remote_big = f"{gcs_bucket}/{tmp_path.name}/big"
    storage.filesystem(remote_big).pipe_file(remote_big, data)
    assert run_dir.fingerprint(remote_big) == run_dir.fingerprint(str(tmp_path / "big"))
    with caplog.at_level("INFO", logger="jax_advprune"):
        copies = [
            storage.local_copy(remote_big, str(tmp_path / "cache"), logging.getLogger("jax_advprune")) for _ in range(2)
        ]
    assert copies[0] == copies[1] and open(copies[0], "rb").read() == data
    assert caplog.text.count("copied ") == 1  # the second call finds the copy
    assert storage.local_copy(str(tmp_path / "big"), str(tmp_path / "cache")) == str(tmp_path / "big")


def test_the_run_lock_of_a_bucket_refuses_a_live_holder_and_takes_over_a_dead_or_silent_one(
    gcs_bucket, tmp_path, caplog
):
    workdir = f"{gcs_bucket}/{tmp_path.name}"
    lock_path = f"{workdir}/lock"
    holder = run_lock.run_lock(workdir)
    assert isinstance(holder, run_lock.ObjectRunLock)
    holder.acquire()
    with pytest.raises(
        run_lock.WorkdirLockedError, match=f"process {os.getpid()} on host {socket.gethostname()}.*still running"
    ):
        run_lock.run_lock(workdir).acquire()
    # Two runs that both read "no lock" before either wrote: the create precondition refuses the later one.
    racing = run_lock.ObjectRunLock(workdir)
    racing._holder = lambda: {}
    with pytest.raises(run_lock.WorkdirLockedError, match="just created by another run"):
        racing.acquire()
    holder.release()
    assert not storage.exists(lock_path)

    fs = storage.filesystem(lock_path)
    fs.pipe_file(
        lock_path,
        json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": "x", "heartbeat": time.time()}).encode(),
    )
    with caplog.at_level("INFO", logger="jax_advprune"):  # a killed holder on this host: taken over at once
        with run_lock.run_lock(workdir):
            assert json.loads(storage.read_text(lock_path))["pid"] == os.getpid()
    assert f"left by process {2**22 + 7}" in caplog.text

    other = {"host": "other-host", "pid": 1, "started": "x"}
    fs.pipe_file(lock_path, json.dumps({**other, "heartbeat": time.time() - 30}).encode())
    with pytest.raises(run_lock.WorkdirLockedError, match="process 1 on host other-host.*last heartbeat 30 s ago"):
        run_lock.run_lock(workdir).acquire()
    fs.pipe_file(
        lock_path, json.dumps({**other, "heartbeat": time.time() - 601}).encode()
    )  # silent for longer than 600 s
    beating = run_lock.ObjectRunLock(workdir, heartbeat_s=0.2)
    beating.acquire()
    first = json.loads(storage.read_text(lock_path))["heartbeat"]
    time.sleep(1.0)
    assert json.loads(storage.read_text(lock_path))["heartbeat"] > first  # the holder keeps its lock fresh
    beating.release()
    assert not storage.exists(lock_path)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_the_emulator_dies_with_the_process_that_started_it_even_on_kill_9():
    """The session fixture's server must not outlive a pytest that is killed: here a process starts it as the fixture
    does, then gets SIGKILL; the server is gone within seconds."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import gcs_emulator; "
        "server, url = gcs_emulator.start('b'); print(server.pid, flush=True); time.sleep(600)"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))], stdout=subprocess.PIPE, text=True
    )
    server_pid = int(starter.stdout.readline())
    assert _alive(server_pid)
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    deadline = time.time() + 10
    while _alive(server_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid), "the emulator outlived the process that started it"
