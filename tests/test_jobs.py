"""`ray job submit` against a head started for this test only (loopback, its own temp dir
and ports); the debug recipe runs as a job and its finished run is found in MLflow. The
head is stopped by ending the processes of that Ray session only (never `ray stop`, which
would stop every Ray instance on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _job_server_available() -> bool:
    """`ray job submit` needs Ray's dashboard (the job server), i.e. ``ray[default]``."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("aiohttp_cors", "grpc", "opencensus", "prometheus_client"))


requires_job_server = pytest.mark.skipif(
    not _job_server_available(),
    reason="ray[default] (the job server: aiohttp_cors, grpcio, opencensus, prometheus_client) not installed;"
    " raydrat depends on it, so this only skips in an environment installed without raydrat's dependencies",
)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _session_pids(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    # A private loopback head for this test only: no token authentication, so the job
    # client needs no token file shared with other Ray instances on this machine.
    env["RAY_AUTH_MODE"] = "disabled"
    # Inherited by the job's processes: a loopback head is never preempted, so Ray Train's
    # preemption watcher (one more actor process to start on 2 cores) is not needed.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, nm, om, agent, metrics, agent_grpc, min_w = _free_ports(8)
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={min_w}",
        f"--max-worker-port={min_w + 100}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield f"http://127.0.0.1:{dash}", temp_dir
    finally:
        pids = _session_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and _session_pids(temp_dir):
            time.sleep(0.5)
        for pid in _session_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@requires_job_server
def test_job_submit_trains_debug_and_records_mlflow(ray_head, demo_dir, tmp_path):
    """The user's path: `ray job submit` (waiting, logs tailed) of jobs/train.py with the debug
    recipe on one parquet file of the demo corpus; the job runs on THIS head (its workers'
    logs are in the head's temp dir: no nested local instance) and its run is in MLflow."""
    address, temp_dir = ray_head
    db = tmp_path / "mlruns.db"
    job_id = f"raydrat-test-{uuid.uuid4().hex[:8]}"
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(REPO / "jobs" / "runtime_env.yaml"),
        "--",
        sys.executable,
        "jobs/train.py",
        "debug",
        "--set",
        f"data.sources=[{{path: {demo_dir / 'corpus' / 'part-00000.parquet'}}}]",
        "--set",
        f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        "--set",
        f"train.storage_path={tmp_path / 'rr'}",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.eval_batches=1",
        "--set",
        "optim.warmup_steps=1",
        "--set",
        f"tracking.tracking_uri=sqlite:///{db}",
        "--set",
        "tracking.run_name=from-a-job",
    ]
    try:
        proc = subprocess.run(submit, capture_output=True, text=True, env=_env(), timeout=240, cwd=REPO)
    except subprocess.TimeoutExpired:
        _stop_job(address, job_id)
        raise
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "final validation loss:" in out
    # Ran on the submitted-to cluster: its Train worker wrote to this head's session logs.
    worker_logs = Path(temp_dir, "session_latest", "logs").glob("worker-*")
    assert any("[raydrat] step 4/4" in f.read_text(errors="replace") for f in worker_logs)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    assert [r.info.run_name for r in runs] == ["from-a-job"]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [2, 4]


def _stop_job(address: str, job_id: str) -> None:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).stop_job(job_id)
    except Exception:  # the head is torn down by the fixture anyway
        pass


def test_runtime_env_uploads_the_whole_package(tmp_path):
    """Ray's own working-dir packaging (what `ray job submit --working-dir .` runs) with the
    shipped jobs/runtime_env.yaml keeps every source file of the package and the entrypoints:
    an unanchored exclude such as ``data/`` once dropped ``raydrat/data/`` from the upload."""
    import zipfile

    import yaml
    from ray._private.runtime_env.packaging import _zip_files

    excludes = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    local_data = REPO / "data"  # a local output (`raydrat data demo`) the excludes must drop
    created = not local_data.exists()
    local_data.mkdir(exist_ok=True)
    marker = local_data / "_upload_probe.txt"
    marker.write_text("local data, not for upload")
    try:
        out = tmp_path / "pkg.zip"
        _zip_files(str(REPO), excludes, str(out), include_gitignore=True)
    finally:
        marker.unlink()
        if created:
            local_data.rmdir()
    names = set(zipfile.ZipFile(out).namelist())
    sources = [p.relative_to(REPO).as_posix() for p in (REPO / "raydrat").rglob("*.py") if "__pycache__" not in p.parts]
    missing = [s for s in sources + ["jobs/train.py", "raydrat/recipes/debug.yaml"] if s not in names]
    assert sources and not missing, f"not uploaded: {missing[:10]}"
    assert "data/_upload_probe.txt" not in names
