"""The Makefile's targets work from a fresh clone: each creates the virtual environment
before it runs anything from it, `make test` runs every test, `make test-fast` the tests not
marked slow, `make lint` ruff's format check and lint; CI lints before it tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _plan(target: str, venv: Path) -> list[str]:
    """The commands ``make TARGET`` would run with no virtual environment yet (``make -n``)."""
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, f"VENV={venv}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if not ln.startswith("make")]


@pytest.mark.parametrize(
    ("target", "runs"),
    [
        ("test", "/bin/python -m pytest -q "),
        ("test-fast", '/bin/python -m pytest -q -m "not slow"'),
        ("lint", "/bin/ruff format --check ."),
        ("demo", "/bin/raydrat train demo"),
    ],
)
def test_each_target_creates_the_venv_before_using_it(target: str, runs: str, tmp_path: Path):
    venv = tmp_path / "fresh-venv"
    plan = _plan(target, venv)
    creates = next(i for i, ln in enumerate(plan) if f"-m venv {venv}" in ln)
    installs = next(i for i, ln in enumerate(plan) if 'pip install -q -e ".[dev]"' in ln)
    used = next(i for i, ln in enumerate(plan) if runs in ln)
    assert creates < installs < used, plan
    assert not venv.exists()  # make -n ran nothing


def test_the_test_targets_differ_only_by_the_slow_marker(tmp_path: Path):
    full = [ln for ln in _plan("test", tmp_path / "v") if "-m pytest" in ln]
    fast = [ln for ln in _plan("test-fast", tmp_path / "v") if "-m pytest" in ln]
    assert len(full) == len(fast) == 1
    assert fast[0].replace(' -m "not slow"', "").strip() == full[0].strip()
    assert "ruff check ." in "\n".join(_plan("lint", tmp_path / "v"))


def test_ci_lints_then_runs_every_test():
    script = (REPO / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines()]
    assert lines.index("make lint") < lines.index("make test")
