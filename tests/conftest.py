"""Shared fixtures: small pools written in the real npz format; 4 virtual CPU devices, on any host.

Native code stays out of the pytest process: its own convolutions are XLA's (the oneDNN custom call is never loaded
here), tests marked `native` run in a child pytest process (a crash there fails that test, by name, and the suite goes
on), and the commands the tests start (the README's command and the like) run as users run them, oneDNN included.
"""

import os

# Before jax is imported anywhere: the suite runs on the CPU platform whatever the host has
# (on a GPU or TPU host too; the subprocesses the tests start inherit it), and multi-device
# code is tested on 4 virtual CPU devices.
os.environ["JAX_PLATFORMS"] = "cpu"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# One persistent compilation cache for the session: the many short runs the tests start (in this process and in
# subprocesses, which inherit the variables) compile the same programs. Removed at exit when made here.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_advprune_test_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import signal
import subprocess
import sys

import numpy as np
import pytest

from jax_advprune.data.generate import write_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_NATIVE_CHILD = os.environ.get("JAX_ADVPRUNE_NATIVE_TEST_CHILD") == "1"


# A whole smoke run of the README's command; the oneDNN fuzz cases, run in child processes.
SLOW_FIXTURES = {"smoke_run", "fuzz_results"}


def pytest_configure(config):
    config.addinivalue_line("markers", "native: loads the oneDNN custom call; runs in a child pytest process")
    config.addinivalue_line(
        "markers",
        "slow: whole runs, TPU compiles, comparisons with reference libraries on trained models, child processes; "
        "`python -m pytest -m 'not slow'` (the fast tier) leaves them out",
    )


@pytest.fixture(scope="session", autouse=True)
def _xla_convolutions_in_this_process():
    """The pytest process's own convolutions are XLA's (not inherited by the processes the tests start)."""
    if IN_NATIVE_CHILD:
        yield
        return
    from jax_advprune.kernels import onednn

    onednn.set_backend("xla")
    yield


def _run_in_child(item) -> None:
    """item's test in a child pytest (its fixtures are set up there again); a crash or failure there fails it here."""
    env = {**os.environ, "JAX_ADVPRUNE_NATIVE_TEST_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", item.nodeid]
    try:
        proc = subprocess.run(cmd, cwd=str(item.config.rootpath), env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process running {item.nodeid} timed out after 900 s", pytrace=False)
    if proc.returncode == 0:
        return
    how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    pytest.fail(f"in a child process ({how}):\n{(proc.stdout + proc.stderr)[-6000:]}", pytrace=False)


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection, which must see the slow marks added here
def pytest_collection_modifyitems(config, items):
    if IN_NATIVE_CHILD:
        return
    for item in items:
        if item.get_closest_marker("native") is not None or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("native") is not None:
            item.runtest = lambda item=item: _run_in_child(item)


def make_npz(path, n, *, shape=(8, 8, 1), num_classes=10, seed=0, offset=0):
    """Writes an npz pool whose image bytes encode the row (for round-trip checks); returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    images[:, 0, 0, 0] = (np.arange(n) + offset) % 256
    labels = np.sort(rng.integers(0, num_classes, n)).astype(np.int64)  # sorted by class, like real pools
    write_npz(str(path), images, labels)
    return images, labels


@pytest.fixture
def small_pool(tmp_path):
    """(pool, original arrays, synthetic arrays): 60 original + 140 synthetic in two parts."""
    from jax_advprune.data.sources import open_pool

    orig = make_npz(tmp_path / "orig.npz", 60, seed=1)
    part1 = make_npz(tmp_path / "syn_part1.npz", 90, seed=2, offset=60)
    part2 = make_npz(tmp_path / "syn_part2.npz", 50, seed=3, offset=150)
    pool = open_pool(str(tmp_path / "orig.npz"), [str(tmp_path / "syn_part1.npz"), str(tmp_path / "syn_part2.npz")], 10)
    images = np.concatenate([orig[0], part1[0], part2[0]])
    labels = np.concatenate([orig[1], part1[1], part2[1]])
    return pool, images, labels


@pytest.fixture(scope="session")
def gcs_bucket():
    """'gs://<bucket>' on a local Google Cloud Storage emulator (gcp-storage-emulator on 127.0.0.1, in memory, with the
    behaviours tests/gcs_emulator.py adds), started for the session and stopped after it; gcsfs and tensorstore,
    here and in the subprocesses the tests start, are pointed at it."""
    import fsspec
    import gcs_emulator

    from jax_advprune import storage

    server, url = gcs_emulator.start("test-bucket")
    environment = gcs_emulator.client_environment(url)  # subprocesses (the command under test) inherit it
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    fsspec.config.conf["gs"] = {"token": "anon"}
    storage.clear_filesystems()
    try:
        yield "gs://test-bucket"
    finally:
        server.kill()
        server.wait()
        fsspec.config.conf.pop("gs", None)
        storage.clear_filesystems()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main_command(workdir, *overrides) -> list[str]:
    """The README's command on the :smoke variant of the default config."""
    return [
        sys.executable,
        "-m",
        "jax_advprune.main",
        "--config",
        os.path.join(REPO, "configs/default.py:smoke"),
        "--workdir",
        str(workdir),
        *overrides,
    ]


def run_main(workdir, *overrides):
    return subprocess.run(main_command(workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(work dir, completed process) of one uninterrupted local smoke run, shared by the tests that read it."""
    workdir = tmp_path_factory.mktemp("smoke")
    first = run_main(workdir)
    assert first.returncode == 0, first.stdout + first.stderr
    return workdir, first
