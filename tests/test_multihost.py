"""Two local processes (CPU, jax.distributed over gloo) train together and agree with one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from conftest import make_npz
from multihost_common import NUM_STEPS, build, flat_params

from jax_advprune.parallel import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_and_match_one_process(tmp_path):
    make_npz(tmp_path / "orig.npz", 40, seed=1)
    make_npz(tmp_path / "syn.npz", 60, seed=2)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(tmp_path), str(tmp_path / f"p{pid}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    results = [dict(np.load(tmp_path / f"p{pid}.npz")) for pid in range(2)]
    assert results[0].keys() == results[1].keys() and len(results[0]) > 4
    for name in results[0]:  # the replicas agree exactly
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)

    # one process, 4 devices, the same global batches: the same update up to float round-off
    state, step_fn, reader = build(str(tmp_path), make_mesh(4), 0, 1)
    for step in range(NUM_STEPS):
        state, metrics = step_fn(state, reader(step))
    reference = flat_params(state)
    for name, value in reference.items():
        np.testing.assert_allclose(results[0][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert abs(float(results[0]["loss"]) - float(metrics["loss"])) < 1e-4
    assert not np.allclose(reference["params['head']['kernel']"], build(str(tmp_path), make_mesh(4), 0, 1)[0].params["head"]["kernel"])


def test_the_readme_two_process_command_finishes_every_phase_with_its_checkpoints(tmp_path):
    """The README's multi-host command, two local processes x 2 CPU devices: scoring model, selection, final model
    and evaluation, with last-N and best-validation checkpoints saved by both processes (orbax's barriers), which
    hung at the first best-validation save before the managers got distinct barrier names."""
    import json

    port = _free_port()
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "jax_advprune.main", "--config", os.path.join(REPO, "configs/default.py:smoke"), "--workdir", str(workdir),
               "--cpu_devices=2", "--config.train.epochs=1", "--config.scoring.train_epochs=1", "--config.train.validation_every_epochs=0.5",
               "--config.eval.apgd_steps=2"]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)  # --cpu_devices decides, as in the README's command
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    results = json.load(open(workdir / "results.json"))
    assert results["devices"] == {"count": 4, "kind": "cpu", "platform": "cpu", "processes": 2}
    for r in results["results"].values():
        assert 0.0 <= r["pgd_accuracy"] <= r["clean_accuracy"] <= 1.0
    for checkpoints in ("scoring_model/checkpoints", "scoring_model/checkpoints_best", "checkpoints", "checkpoints_best"):
        assert os.listdir(workdir / checkpoints), checkpoints
