"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (ruff, from the [test] extra): CI runs the
tests, so it checks this too. To fix: `ruff format . && ruff check --fix .`."""

import subprocess
import sys

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_code_is_formatted():
    proc = _ruff("format", "--check", ".")
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_linter_finds_nothing():
    proc = _ruff("check", ".")
    assert proc.returncode == 0, (
        "run `ruff check --fix .`, then fix what is left:\n" + proc.stdout[-3000:] + proc.stderr[-2000:]
    )
