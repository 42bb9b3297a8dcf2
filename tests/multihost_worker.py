"""One process of the two-process training test (tests/test_multihost.py); not a test module itself.

    python tests/multihost_worker.py <pool_dir> <out.npz>

Environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (read by
jax_advprune.parallel.initialize_distributed, as in a real multi-host launch).
Runs training steps on its share of each global batch and saves the parameters.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multihost_common import NUM_STEPS, build, flat_params  # noqa: E402

from jax_advprune import parallel  # noqa: E402


def main():
    pool_dir, out = sys.argv[1], sys.argv[2]
    assert parallel.initialize_distributed("auto"), "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES not set"
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = parallel.make_mesh()
    state, step_fn, reader = build(pool_dir, mesh, jax.process_index(), jax.process_count())
    for step in range(NUM_STEPS):
        state, metrics = step_fn(state, reader(step))
    loss = float(np.asarray(metrics["loss"].addressable_data(0)))
    np.savez(out, loss=loss, **flat_params(state))


if __name__ == "__main__":
    main()
