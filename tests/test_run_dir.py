"""The work directory (`run_dir`, `run_lock`, `storage`): when a phase is complete, run lock, settings guard, input
fingerprints, atomic writes, metrics records."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from jax_advprune import run_dir, run_lock, storage
from jax_advprune.metrics import Progress

HOLD_LOCK = "import sys, time; from jax_advprune.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"


def test_a_second_process_is_refused_with_the_holders_host_and_pid_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_lock.WorkdirLockedError, match=f"process {holder.pid} on host {socket.gethostname()}"):
            run_lock.RunLock(str(tmp_path)).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == holder.pid  # left behind by the killed holder
    lock = run_lock.RunLock(str(tmp_path))
    with caplog.at_level("INFO", logger="jax_advprune"):
        lock.acquire()
    assert f"left by process {holder.pid}" in caplog.text
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "lock").read_text() == ""  # released: the next run takes it silently
    with run_lock.RunLock(str(tmp_path)):
        pass


def test_a_lock_file_naming_another_host_is_refused(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"host": "other-host", "pid": 1, "started": "x"}))
    with pytest.raises(run_lock.WorkdirLockedError, match="process 1 on host other-host.*delete the lock file"):
        run_lock.RunLock(str(tmp_path)).acquire()


def test_settings_of_a_phase_with_outputs_are_guarded_and_of_one_without_replaced(tmp_path):
    workdir = str(tmp_path)
    run_dir.record_settings(workdir, "select", {"pruning": {"keep_ratio": 0.5}})
    run_dir.check_settings(
        workdir, "select", {"pruning": {"keep_ratio": 0.75}}, has_outputs=False
    )  # failed before writing: free
    with pytest.raises(run_dir.SettingsMismatchError, match=r"pruning.keep_ratio: 0.5 -> 0.75"):
        run_dir.check_settings(workdir, "select", {"pruning": {"keep_ratio": 0.75}}, has_outputs=True)
    run_dir.record_settings(workdir, "select", {"pruning": {"keep_ratio": 0.75}})
    assert json.loads((tmp_path / "settings" / "select.json").read_text()) == {"pruning": {"keep_ratio": 0.75}}


def test_fingerprints_follow_content_and_size_at_the_cost_of_sampled_blocks(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "copy").write_bytes(data)
    assert run_dir.fingerprint(str(tmp_path / "a")) == run_dir.fingerprint(str(tmp_path / "copy"))
    (tmp_path / "b").write_bytes(os.urandom(3 << 20))  # a regenerated file of the same size
    (tmp_path / "c").write_bytes(data + b"x")
    fingerprints = {run_dir.fingerprint(str(tmp_path / name)) for name in ("a", "b", "c")}
    assert len(fingerprints) == 3
    (tmp_path / "small").write_bytes(b"12345")  # smaller than a block
    assert run_dir.fingerprint(str(tmp_path / "small")).startswith("5:")


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    storage.write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with storage.atomic_output(str(path)) as tmp, open(tmp, "w") as f:
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
    run_dir.add_phase_seconds(str(tmp_path), "train", 1.5)
    run_dir.add_phase_seconds(str(tmp_path), "train", 2.0)
    assert json.loads((tmp_path / "timings.json").read_text()) == {"train": 3.5}


def test_a_phase_is_complete_only_once_its_last_file_is_written(tmp_path):
    """What the phases skip on, `validate` checks and `export_selection` and `weights` read: score and select are
    complete with their meta.json (written after their arrays), evaluate with results.json, train with a checkpoint."""
    workdir = str(tmp_path)
    assert not any(run_dir.is_complete(workdir, p) or run_dir.has_outputs(workdir, p) for p in run_dir.PHASES)
    storage.save_npy(
        run_dir.score_file(workdir, "margin"), np.zeros(3, np.float32)
    )  # a score phase cut off before its meta.json
    assert run_dir.has_outputs(workdir, "score") and not run_dir.is_complete(workdir, "score")
    storage.write_json(os.path.join(run_dir.scores_dir(workdir), "meta.json"), {})
    assert run_dir.is_complete(workdir, "score")
    storage.save_npy(run_dir.selection_file(workdir, "keep.npy"), np.ones(3, bool))
    assert run_dir.has_outputs(workdir, "select") and not run_dir.is_complete(workdir, "select")
    storage.write_json(run_dir.selection_file(workdir, "meta.json"), {})
    assert run_dir.is_complete(workdir, "select") and not run_dir.is_complete(workdir, "train")
    os.makedirs(run_dir.final_checkpoint_dir(workdir))
    assert not run_dir.is_complete(workdir, "train")  # an empty checkpoint directory holds no model
    os.makedirs(os.path.join(run_dir.final_checkpoint_dir(workdir), "10"))
    assert run_dir.is_complete(workdir, "train") and not run_dir.is_complete(workdir, "evaluate")
    storage.write_json(run_dir.results_file(workdir), {})
    assert run_dir.is_complete(workdir, "evaluate")
    with pytest.raises(ValueError, match="phase must be one of"):
        run_dir.is_complete(workdir, "selection")
