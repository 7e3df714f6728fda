"""Shared fixtures: one demo corpus per test session, Ray started and stopped around the
tests that need it, and global torch state restored after every test."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import faults
import pytest
import ray.cloudpickle
import torch

REPO = Path(__file__).resolve().parents[1]

# no test reads or writes the user's op-level plan cache (the tests that exercise it give
# their own folder); set before any Ray worker starts, so the workers inherit it
os.environ["RAYDRAT_PLAN_CACHE"] = "off"


# test callbacks travel to Ray workers by value (the workers cannot import the tests)
ray.cloudpickle.register_pickle_by_value(faults)


def raydrat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "raydrat.cli", *args]


def faulty_raydrat_cmd(faults_spec: list, *args: str) -> list[str]:
    """``raydrat ARGS`` with the fit callbacks of ``faults_spec`` (see :func:`faults.main`)."""
    return [sys.executable, "-c", "import sys, faults; sys.exit(faults.main())", json.dumps(faults_spec), *args]


def cli_env(env: dict | None = None) -> dict:
    """The environment of a raydrat subprocess: unbuffered, this checkout and the tests'
    fault callbacks importable, a local Ray instance of its own."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return full_env


def run_cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, faults_spec: list | None = None
) -> subprocess.CompletedProcess:
    cmd = faulty_raydrat_cmd(faults_spec, *args) if faults_spec else raydrat_cmd(*args)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=cli_env(env))


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_allocator_profiler_left_running():
    """Every run's PeakMemory lets the process's one profiler session go when it is done
    (or garbage-collected): a test that leaks it would slow every later test."""
    yield
    from raydrat.core.memory.peak import SESSION

    if SESSION.running:
        gc.collect()
    assert not SESSION.running, "the allocator profiler session is still running after the test"


@pytest.fixture(scope="module")
def op_setup():
    """The op-level recomputation tests' model config, tokens and measured op costs
    (:func:`oplevel.measured_setup`), measured once per module."""
    from oplevel import measured_setup

    return measured_setup()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded demo corpus, built once per session (vocab of the debug recipe)."""
    from raydrat.config import load_config
    from raydrat.core.data.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    cfg = load_config("debug")
    build_demo_corpus(out, cfg.model.vocab_size)
    return out


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server in a temp dir of its own (raydrat.bench.pgserver), started for
    the session and stopped after it. Without PostgreSQL's binaries the tests that use it
    fail, naming what to install (`.ci/run` installs it): they are never skipped."""
    from raydrat.bench.pgserver import LocalPostgres, PostgresUnavailable

    try:
        server = LocalPostgres().start()
    except PostgresUnavailable as exc:
        pytest.fail(f"these tests need a PostgreSQL server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raydrat.ray_session import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
