"""The host CPU as /proc/cpuinfo describes it: its model name and instruction-set flags (no jax import, so that
benchmarks can read it before they cap the instruction set of the libraries they time)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU; ('unknown', empty) where /proc/cpuinfo cannot be read (not Linux)."""
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, flags
