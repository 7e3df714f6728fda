"""Ctrl-C and SIGTERM sent by the test to a real `raydrat train` process: exit 130 / 143,
the MLflow run ended KILLED, only complete checkpoints left, the resume command printed;
then --resume (once after each signal) skips a checkpoint the test truncated, says so, and
the run finishes in the same MLflow run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import raydrat_cmd

from raydrat.core.checkpoint.state import checkpoint_step, verify_checkpoint
from raydrat.ray_train.resume import checkpoint_dirs

pytestmark = pytest.mark.slow

STEPS = 40
RUN = "sig"


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # its own session, as a shell gives a foreground job: Ctrl-C reaches the whole group
    return subprocess.Popen(
        raydrat_cmd(*args), cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, past_step: int, log: Path, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        steps = [checkpoint_step(d) for d in checkpoint_dirs(run_dir) if verify_checkpoint(d, checksums=False) is None]
        if steps and max(steps) > past_step:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint past step {past_step}: {log.read_text()[-4000:]}")


def _status(db: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    return run.info.status, run.info.run_id, client


def test_sigint_and_sigterm_stop_cleanly_and_the_run_resumes(demo_dir: Path, tmp_path: Path):
    db, storage = tmp_path / "mlruns.db", tmp_path / "ray_results"
    args = [
        "train",
        "debug",
        "--set",
        f"data.demo_dir={demo_dir}",
        "--set",
        f"train.storage_path={storage}",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.eval_every=1000",
        "--set",
        "train.log_every=2",
        "--set",
        f"tracking.tracking_uri=sqlite:///{db}",
        "--set",
        f"tracking.run_name={RUN}",
    ]
    run_dir = storage / RUN
    resumed_from, newest = [], None
    for i, (sig, code) in enumerate(((signal.SIGINT, 130), (signal.SIGTERM, 143))):
        log = tmp_path / f"run{i}.log"
        proc = _start(args + (["--resume", RUN] if i else []), tmp_path, log)
        seen = _wait_for_checkpoint(proc, run_dir, 4 if i == 0 else resumed_from[-1] + 2, log)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, sig)  # what `kill`, a scheduler or a container runtime does
        assert proc.wait(timeout=120) == code, log.read_text()[-4000:]
        out = log.read_text()
        last = out.strip().splitlines()
        assert any(f"interrupted by {sig.name}" in ln for ln in last[-3:]), out[-3000:]
        assert re.search(rf"raydrat train debug .*--resume {RUN}$", out.strip(), re.M), out[-3000:]
        # no traceback of the driver's (Ray's actors may log noise of their own, each line prefixed)
        assert not re.search(r"^Traceback \(most recent call last\):", out, re.M), out[-4000:]
        status, run_id, client = _status(db)
        assert status == "KILLED"
        dirs = [d for d in checkpoint_dirs(run_dir) if not (i and d == newest)]  # but the one damaged below
        assert dirs and all(verify_checkpoint(d) is None for d in dirs), [verify_checkpoint(d) for d in dirs]
        assert max(checkpoint_step(d) for d in dirs) >= seen
        if i == 0:  # damage the newest checkpoint: the resume must skip it and say why
            newest = dirs[-1]
            (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:4096])
            expected_start = checkpoint_step(dirs[-2])
        if i == 1:
            m = re.search(r"resumed at step (\d+)", out)
            assert m and int(m.group(1)) == expected_start, out[-3000:]
            assert f"skipped {newest.name}: state.pt (rank 0) is 4096 bytes" in out, out[-3000:]
        resumed_from.append(seen)

    log = tmp_path / "run2.log"
    proc = _start(args + ["--resume", RUN], tmp_path, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    status, run_id, client = _status(db)
    assert status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    assert max(steps) == STEPS and len(client.get_metric_history(run_id, "resumed_from_step")) == 2
