"""The work directory: run lock, settings guard, input fingerprints, atomic writes, metrics records."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jax_advprune import workdir as workdir_lib
from jax_advprune.metrics import Progress

HOLD_LOCK = "import sys, time; from jax_advprune.workdir import RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"


def test_a_second_process_is_refused_with_the_holders_host_and_pid_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {holder.pid} on host {socket.gethostname()}"):
            workdir_lib.RunLock(str(tmp_path)).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == holder.pid  # left behind by the killed holder
    lock = workdir_lib.RunLock(str(tmp_path))
    with caplog.at_level("INFO", logger="jax_advprune"):
        lock.acquire()
    assert f"left by process {holder.pid}" in caplog.text
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "lock").read_text() == ""  # released: the next run takes it silently
    with workdir_lib.RunLock(str(tmp_path)):
        pass


def test_a_lock_file_naming_another_host_is_refused(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"host": "other-host", "pid": 1, "started": "x"}))
    with pytest.raises(workdir_lib.WorkdirLockedError, match="process 1 on host other-host.*delete the lock file"):
        workdir_lib.RunLock(str(tmp_path)).acquire()


def test_settings_of_a_phase_with_outputs_are_guarded_and_of_one_without_replaced(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.record_settings(workdir, "select", {"pruning": {"keep_ratio": 0.5}})
    workdir_lib.check_settings(workdir, "select", {"pruning": {"keep_ratio": 0.75}}, has_outputs=False)  # failed before writing: free
    with pytest.raises(workdir_lib.SettingsMismatchError, match=r"pruning.keep_ratio: 0.5 -> 0.75"):
        workdir_lib.check_settings(workdir, "select", {"pruning": {"keep_ratio": 0.75}}, has_outputs=True)
    workdir_lib.record_settings(workdir, "select", {"pruning": {"keep_ratio": 0.75}})
    assert json.loads((tmp_path / "settings" / "select.json").read_text()) == {"pruning": {"keep_ratio": 0.75}}


def test_fingerprints_follow_content_and_size_at_the_cost_of_sampled_blocks(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "copy").write_bytes(data)
    assert workdir_lib.fingerprint(str(tmp_path / "a")) == workdir_lib.fingerprint(str(tmp_path / "copy"))
    (tmp_path / "b").write_bytes(os.urandom(3 << 20))  # a regenerated file of the same size
    (tmp_path / "c").write_bytes(data + b"x")
    fingerprints = {workdir_lib.fingerprint(str(tmp_path / name)) for name in ("a", "b", "c")}
    assert len(fingerprints) == 3
    (tmp_path / "small").write_bytes(b"12345")  # smaller than a block
    assert workdir_lib.fingerprint(str(tmp_path / "small")).startswith("5:")


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    workdir_lib.write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with workdir_lib.atomic_output(str(path)) as tmp, open(tmp, "w") as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_a_resumed_loop_drops_the_records_after_its_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = Progress("train", 10, 4, path)
    for step in range(1, 8):
        first.update(step, loss=1.0)
    Progress("score/train", 10, 4, path).update(1, loss=2.0)
    with open(path, "a") as f:
        f.write('{"phase": "train", "step": 8, "lo')  # a line cut off by the kill
    resumed = Progress("train", 10, 4, path, first_step=5)  # the last checkpoint was step 5
    for step in range(6, 11):
        resumed.update(step, loss=1.0)
    records = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in records if r["phase"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in records if r["phase"] == "score/train"] == [1]


def test_phase_wall_times_add_up_over_resumed_runs(tmp_path):
    workdir_lib.add_phase_seconds(str(tmp_path), "train", 1.5)
    workdir_lib.add_phase_seconds(str(tmp_path), "train", 2.0)
    assert json.loads((tmp_path / "timings.json").read_text()) == {"train": 3.5}
