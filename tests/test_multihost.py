"""The README's multi-host command, local processes x CPU devices (jax.distributed over gloo), through every phase:
the same outcome as one process, bitwise; preemption (SIGTERM) and kill -9 of one process with a restart of all;
four processes sharing a work directory in a gs:// bucket (a local Cloud Storage emulator)."""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, main_command

from jax_advprune import storage
from jax_advprune.children import die_with_parent
from jax_advprune.phases.weights import saved_state

pytestmark = pytest.mark.slow  # whole runs of the command, minutes each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The smoke config, shorter: 24 training steps per model, validated twice, DeepFool on a pool of 1,828.
CLI_OVERRIDES = [
    "--config.train.epochs=1",
    "--config.scoring.train_epochs=1",
    "--config.train.validation_every_epochs=0.5",
    "--config.data.synthetic_size=300",
    "--config.scoring.deepfool.max_iter=4",
    "--config.eval.pgd_steps=2",
    "--config.eval.apgd_steps=1",
]


def _launch(workdir, processes: int, devices: int, log_name: str, *extra: str, logs=None) -> list[subprocess.Popen]:
    """The README's multi-host command on the smoke config (shortened): `processes` local processes x `devices` CPU
    devices, with their output in <logs or workdir>.<log_name>.p<i>.log. One process is started the same way (through
    jax.distributed, so that its cross-device sums go through gloo as a multi-process run's do)."""
    port = _free_port()
    command = main_command(workdir, f"--cpu_devices={devices}", *CLI_OVERRIDES, *extra)
    procs = []
    for pid in range(processes):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(pid),
        )
        env.pop("XLA_FLAGS", None)  # --cpu_devices decides, as in the README's command
        log = open(f"{logs or workdir}.{log_name}.p{pid}.log", "w")
        procs.append(
            subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent()
            )
        )
        log.close()
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit statuses of `procs`; any still running after `timeout` seconds is killed (None for those)."""
    deadline = time.time() + timeout
    statuses = []
    for proc in procs:
        try:
            statuses.append(proc.wait(timeout=max(deadline - time.time(), 0.1)))
        except subprocess.TimeoutExpired:
            statuses.append(None)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return statuses


def _logs(workdir, log_name: str, processes: int, tail: int | None = 3000) -> str:
    """The processes' logs, each cut to its last `tail` characters (None: whole; the run log names every convolution
    shape's route, so a line from early in a phase may be far from the end)."""
    return "\n".join(
        f"--- process {pid}\n" + open(f"{workdir}.{log_name}.p{pid}.log").read()[-(tail or 0) :]
        for pid in range(processes)
    )


def _run(workdir, processes: int, devices: int, *extra: str, logs=None) -> None:
    procs = _launch(workdir, processes, devices, "run", *extra, logs=logs)
    assert _wait(procs, 600) == [0] * processes, _logs(logs or workdir, "run", processes)


def _outcome(workdir) -> dict:
    """What a run decided and reported: results.json without wall times and process count, the scores and the
    selection, and the final checkpoint's EMA parameters."""
    workdir = str(workdir)  # a local path or a gs:// URL
    results = json.loads(storage.read_text(f"{workdir}/results.json"))
    results.pop("wall_seconds")
    results["devices"].pop("processes")
    _, state, step = saved_state(workdir)
    assert step == results["checkpoint_step"]
    arrays = {
        name: storage.load_npy(f"{workdir}/{name}")
        for name in ("scores/margin.npy", "selection/keep.npy", "selection/eps.npy")
        if storage.exists(f"{workdir}/{name}")
    }
    arrays.update(
        {
            "ema" + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state["ema_params"])
        }
    )
    return {"results": results, "arrays": arrays}


def _assert_same_outcome(a: dict, b: dict) -> None:
    assert a["results"] == b["results"]
    assert a["arrays"].keys() == b["arrays"].keys()
    for name in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][name], b["arrays"][name], err_msg=name)


def _wait_for(condition, procs, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert all(proc.poll() is None for proc in procs), f"a process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _has_step(directory, at_least: int = 1):
    return lambda: (
        directory.is_dir() and any(name.isdigit() and int(name) >= at_least for name in os.listdir(directory))
    )


def test_two_processes_killed_preempted_and_restarted_end_with_the_outcome_of_one_process(tmp_path):
    """2 processes x 2 CPU devices through every phase: one process killed (kill -9) while the scoring model
    trains, the survivor stopped, all restarted; then a preemption (SIGTERM to every process) while the final model
    trains: each process saves the same step and exits with status 143 within a minute; restarted again, the run ends
    with the DeepFool margins, selection, final weights and results.json of one process on the same 4 devices,
    bitwise, and with the last-N and best-validation checkpoints of both models saved by both processes (orbax's
    barriers; the first best-validation save hung before the managers got distinct barrier names)."""
    workdir = tmp_path / "two"
    procs = _launch(workdir, 2, 2, "first")
    _wait_for(
        _has_step(workdir / "scoring_model" / "checkpoints", 20), procs, "the scoring model's checkpoint at step 20"
    )
    procs[1].kill()
    # The survivor stops by itself, at once when its next collective fails, or when JAX's coordination service
    # misses the dead process's heartbeats (100 s); a scheduler stops it sooner, as this does after 10 s.
    assert _wait(procs[:1], 10)[0] != 0, _logs(workdir, "first", 1)
    procs[1].wait()

    procs = _launch(workdir, 2, 2, "second")
    _wait_for(lambda: (workdir / "checkpoints").is_dir(), procs, "the final model's training")
    start = time.time()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    statuses = _wait(procs, 60)
    logs = _logs(workdir, "second", 2, tail=None)
    assert statuses == [143, 143] and time.time() - start < 60, logs
    assert f"resumed from {workdir / 'scoring_model' / 'checkpoints'} at step 20" in logs
    saved = max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert f"preempted (SIGTERM): saved step {saved} of 24 in {workdir / 'checkpoints'}" in logs

    procs = _launch(workdir, 2, 2, "third")
    assert _wait(procs, 600) == [0, 0], _logs(workdir, "third", 2)
    assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in _logs(workdir, "third", 2, tail=None)
    results = json.load(open(workdir / "results.json"))
    assert results["devices"] == {"count": 4, "kind": "cpu", "platform": "cpu", "processes": 2}
    for checkpoints in (
        "scoring_model/checkpoints",
        "scoring_model/checkpoints_best",
        "checkpoints",
        "checkpoints_best",
    ):
        assert any(name.isdigit() for name in os.listdir(workdir / checkpoints)), checkpoints

    _run(tmp_path / "one", 1, 4)
    _assert_same_outcome(_outcome(workdir), _outcome(tmp_path / "one"))


def test_four_processes_of_two_devices_on_a_bucket_give_the_outcome_of_one_process_of_eight(tmp_path, gcs_bucket):
    """Random pruning (the scoring phase is the two-process test's): training with both kinds of checkpoint,
    and evaluation, on 8 devices of 4 processes sharing a gs:// work directory (process 0 writing the run's files,
    every process its share of each checkpoint), and of one process on a local disk."""
    four = f"{gcs_bucket}/{tmp_path.name}/four"
    _run(four, 4, 2, "--config.pruning.strategy=random", logs=tmp_path / "four")
    assert json.loads(storage.read_text(f"{four}/results.json"))["devices"] == {
        "count": 8,
        "kind": "cpu",
        "platform": "cpu",
        "processes": 4,
    }
    assert any(name.isdigit() for name in storage.listdir(f"{four}/checkpoints_best"))
    assert not storage.exists(f"{four}/lock") and "done (score, select, train, evaluate)" in storage.read_text(
        f"{four}/run.log"
    )
    _run(tmp_path / "one", 1, 8, "--config.pruning.strategy=random")
    _assert_same_outcome(_outcome(four), _outcome(tmp_path / "one"))
