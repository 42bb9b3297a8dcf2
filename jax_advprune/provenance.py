"""What produced a result: the package version, the git commit, the devices."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess

import jax

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def code_version() -> dict:
    """{'version': the installed package version, 'git_commit': HEAD of the checkout (None outside one),
    'git_dirty': whether tracked files differ from it}."""
    try:
        version = importlib.metadata.version("jax_advprune")
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit, dirty = None, None
    try:
        git = ["git", "-C", PACKAGE_DIR]
        commit = subprocess.run(
            git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": version, "git_commit": commit or None, "git_dirty": dirty}


def device_summary(mesh) -> dict:
    """The devices a run computed on: platform, kind, how many in the mesh, processes."""
    device = mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "count": int(mesh.size),
        "processes": jax.process_count(),
    }
