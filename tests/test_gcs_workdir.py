"""The README's command with its work directory and every data file in a gs:// bucket (a local Cloud Storage
emulator): the run lock refuses a second run, a kill -9 and a rerun resume there, remote data is copied once
into data.cache_dir, and results.json equals that of the same run on a local disk."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, main_command

from jax_advprune import storage
from jax_advprune.children import die_with_parent

pytestmark = pytest.mark.slow  # whole runs of the command, minutes each

CHECKPOINT_EVERY = ["--config.train.checkpoint_every=8"]


def _without_wall_times(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "wall_seconds"}


def test_a_gs_workdir_with_gs_data_locks_resumes_after_kill_and_matches_a_local_run(gcs_bucket, smoke_run, tmp_path):
    local_dir, _ = smoke_run
    root = f"{gcs_bucket}/{tmp_path.name}"
    fs = storage.filesystem(root)
    for name in ("train", "test", "synthetic"):  # the smoke run's own data, as the npz source reads it
        fs.put_file(str(local_dir / "data" / f"{name}.npz"), f"{root}/data/{name}.npz")
    work = f"{root}/run"
    data = [
        "--config.data.name=npz",
        f"--config.data.original={root}/data/train.npz",
        f"--config.data.test={root}/data/test.npz",
        f"--config.data.synthetic=('{root}/data/synthetic.npz',)",
    ]
    command = main_command(work, *data, *CHECKPOINT_EVERY)

    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent()
    )
    deadline = time.time() + 300
    while not (storage.exists(f"{work}/lock") and storage.read_text(f"{work}/lock")):
        assert first.poll() is None and time.time() < deadline, "the first run ended before taking the lock"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGSTOP)  # paused while a second run tries the same work directory
    try:
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"in use by another run: process {first.pid} on host" in second.stderr and "Traceback" not in second.stderr

    while True:  # a final-model checkpoint before the last step is complete in the bucket: kill -9
        steps = [int(n) for n in storage.listdir(f"{work}/checkpoints") if n.isdigit()]
        if any(16 <= s < 48 for s in steps):
            break
        assert first.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not storage.exists(f"{work}/results.json")

    cache = tmp_path / "cache"
    resumed = subprocess.run(
        command + [f"--config.data.cache_dir={cache}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"taking over {work}/lock left by process {first.pid}" in resumed.stdout
    assert f"resumed from {work}/checkpoints at step" in resumed.stdout
    assert resumed.stdout.count("copied gs://") == 3
    copies = sorted(f.split("_", 1)[1] for f in os.listdir(cache) if f.endswith(".npz"))
    assert copies == ["synthetic.npz", "test.npz", "train.npz"]  # read from there: one local copy of each file
    assert not storage.exists(f"{work}/lock")  # released at the end

    local = json.loads((local_dir / "results.json").read_text())
    remote = json.loads(storage.read_text(f"{work}/results.json"))
    assert _without_wall_times(remote) == _without_wall_times(local)
    records = [json.loads(line) for line in storage.read_text(f"{work}/metrics.jsonl").splitlines()]
    assert len({(r["phase"], r["step"], "loss" in r) for r in records}) == len(
        records
    )  # each step once, after the kill too
    assert "done (score, select, train, evaluate)" in storage.read_text(f"{work}/run.log")
    assert {"evaluate", "train"} <= set(storage.listdir(f"{work}/tensorboard"))
