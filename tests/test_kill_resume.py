"""A training run killed with SIGKILL, rerun and preempted with SIGTERM, and rerun again ends bitwise equal to an
uninterrupted run; the run lock refuses a second run on the same work directory and is taken over after the kill;
metrics hold each step once."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, main_command

from jax_advprune.children import die_with_parent
from jax_advprune.phases.weights import saved_state

pytestmark = pytest.mark.slow  # whole runs of the command, minutes each

# Random pruning (no scoring phase), a short evaluation, a checkpoint every 8 of 48 steps.
OVERRIDES = [
    "--config.pruning.strategy=random",
    "--config.train.checkpoint_every=8",
    "--config.train.log_every_steps=1",
    "--config.eval.pgd_steps=1",
    "--config.eval.attack=pgd",
]


def _command(workdir):
    return main_command(workdir, *OVERRIDES)


def _final_state(workdir):
    _, state, step = saved_state(str(workdir))
    return step, {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


def test_sigkill_then_sigterm_mid_training_then_rerun_matches_uninterrupted_run_bitwise(tmp_path):
    straight = subprocess.run(_command(tmp_path / "straight"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(killed_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    deadline = time.time() + 300
    while not (killed_dir / "lock").exists() or not (killed_dir / "lock").read_text():  # the first run holds the lock
        assert proc.poll() is None and time.time() < deadline, "the first run ended before taking the lock"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)  # paused while a second run tries the same work directory
    try:
        second = subprocess.run(_command(killed_dir), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"in use by another run: process {proc.pid} on host" in second.stderr and "Traceback" not in second.stderr

    while time.time() < deadline:  # wait until a mid-run checkpoint is complete, then kill
        names = os.listdir(killed_dir / "checkpoints") if (killed_dir / "checkpoints").exists() else []
        if any(name.isdigit() and 16 <= int(name) < 48 for name in names):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "results.json").exists()

    # Rerun, then a preemption (SIGTERM) once training has resumed: the step in progress is saved, status 143.
    log_size = (killed_dir / "run.log").stat().st_size
    preempted = subprocess.Popen(
        _command(killed_dir),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=die_with_parent(),
    )
    while "[train] resumed from" not in (killed_dir / "run.log").read_text()[log_size:]:
        assert preempted.poll() is None and time.time() < deadline, "the rerun ended before resuming training"
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)
    out = preempted.communicate(timeout=60)[0]
    assert preempted.returncode == 143, out[-3000:]
    assert f"taking over {killed_dir / 'lock'} left by process {proc.pid}" in out
    saved = max(int(name) for name in os.listdir(killed_dir / "checkpoints") if name.isdigit())
    assert saved < 48 and f"preempted (SIGTERM): saved step {saved} of 48" in out

    resumed = subprocess.run(_command(killed_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {killed_dir / 'checkpoints'} at step {saved}" in resumed.stdout
    records = [json.loads(line) for line in open(killed_dir / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if r["phase"] == "train" and "loss" in r]
    assert train_steps == list(
        range(1, 49)
    )  # logged every step, each once, although steps after the checkpoint ran twice
    assert len({(r["phase"], r["step"], "loss" in r) for r in records}) == len(records)
    step_a, state_a = _final_state(tmp_path / "straight")
    step_b, state_b = _final_state(killed_dir)
    assert step_a == step_b == 48
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        np.testing.assert_array_equal(state_a[name], state_b[name], err_msg=name)
