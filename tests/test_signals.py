"""Faults around a real `raydrat train` process. Ctrl-C and SIGTERM sent by the test: exit
130 / 143, the MLflow run ended KILLED, only complete checkpoints left, the resume command
printed; then --resume (once after each signal) skips a checkpoint the test truncated, says
so, and after a SIGKILL of the driver says its last driver died, and the run finishes in the
same MLflow run. Two runs started at once with one name: one runs, one is refused. A disk
that fills up during a checkpoint: one line, the partial checkpoint removed, and the printed
resume command finishes the run."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, raydrat_cmd, run_cli

from raydrat import interrupt
from raydrat.core.checkpoint.state import checkpoint_step, verify_checkpoint
from raydrat.ray_train.resume import checkpoint_dirs

STEPS = 40
RUN = "sig"


def test_a_closed_terminal_stops_the_run_like_ctrl_c_unless_nohup_ignores_it():
    """SIGHUP (the terminal closed) is caught like SIGINT and SIGTERM (exit 129); a SIGHUP
    ignored when the run started, as under ``nohup``, stays ignored."""
    with pytest.raises(interrupt.Interrupted) as stopped, interrupt.trapped():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
    assert stopped.value.signame == "SIGHUP" and stopped.value.exit_code == 129
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupt.trapped():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.5)
        assert interrupt.received() is None
    finally:
        signal.signal(signal.SIGHUP, previous)


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


@pytest.mark.slow
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

    # a driver killed outright (SIGKILL: nothing of it runs again) leaves its run resumable
    log = tmp_path / "run2.log"
    proc = _start(args + ["--resume", RUN], tmp_path, log)
    _wait_for_checkpoint(proc, run_dir, resumed_from[-1] + 2, log)
    killed = proc.pid
    os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    log = tmp_path / "run3.log"
    proc = _start(args + ["--resume", RUN], tmp_path, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    out = log.read_text()
    print(out)  # the console, for the record (pytest -rA)
    assert re.search(
        rf"run {RUN}: its last driver \(pid {killed} on \S+\) ended without closing it \(killed\?\)", out
    ), out[-3000:]
    status, run_id, client = _status(db)
    assert status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    assert max(steps) == STEPS and len(client.get_metric_history(run_id, "resumed_from_step")) == 3


def _train_args(demo_dir: Path, tmp: Path, storage: Path, *sets: str) -> list[str]:
    base = (
        f"data.demo_dir={demo_dir}",
        f"train.storage_path={storage}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}",
        "train.eval_every=1000",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "optim.warmup_steps=2",
        *sets,
    )
    return ["train", "debug", *(a for s in base for a in ("--set", s))]


@pytest.mark.slow
def test_two_runs_started_at_once_with_one_name_give_one_run_and_one_refusal(demo_dir, tmp_path):
    args = _train_args(demo_dir, tmp_path, tmp_path / "rr", "train.steps=4", "tracking.run_name=twin")
    procs = [
        subprocess.Popen(
            raydrat_cmd(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    print(*(err for _, err in outs), sep="\n-----\n")  # the consoles, for the record (pytest -rA)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    refused = outs[codes.index(2)][1].strip().splitlines()
    errors = [ln for ln in refused if ln.startswith("raydrat: error: ")]
    assert errors == refused[-1:] and "--resume twin" in errors[0], refused

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    assert run.info.run_name == "twin" and run.info.status == "FINISHED"
    run_dir = tmp_path / "rr" / "twin"
    assert json.loads((run_dir / "raydrat_run.json").read_text())["mlflow_run_id"] == run.info.run_id
    steps = [checkpoint_step(d) for d in checkpoint_dirs(run_dir)]  # one run's saves, not two interleaved
    assert sorted(steps) == [2, 4], steps


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root: skipped without), unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_run_resumes(demo_dir, tmp_path, small_disk):
    storage = small_disk / "rr"
    args = _train_args(demo_dir, tmp_path, storage, "train.steps=8", "tracking.run_name=full")
    fill = [["FillDiskAt", {"step": 5, "path": str(small_disk), "leave": 64 * 1024}]]
    crashed = run_cli(args, cwd=tmp_path, faults_spec=fill)
    print(crashed.stderr)  # the console, for the record (pytest -rA)
    err = crashed.stderr.strip().splitlines()
    assert crashed.returncode == 1, crashed.stderr[-5000:]
    errors = [ln for ln in err if ln.startswith("raydrat: error:")]
    assert len(errors) == 1 and "Traceback" not in crashed.stderr + crashed.stdout, crashed.stderr[-5000:]
    line = errors[0]
    assert line.startswith("raydrat: error: run full: disk full: no space left on device writing to "), line
    assert str(small_disk) in line and re.search(r"\(\d[\d,.]* (B|KiB) free of 24\.0 MiB\)", line), line
    tail = err[err.index(line) + 1 :]
    assert tail[0].startswith("  removed the incomplete checkpoint(s) it left: checkpoint_"), tail
    assert tail[1].startswith("  newest complete checkpoint: checkpoint_") and "(step 4)" in tail[1], tail
    command = tail[2].strip()
    assert command.startswith("raydrat train debug ") and command.endswith(" --resume full"), tail
    run_dir = storage / "full"
    dirs = checkpoint_dirs(run_dir)
    assert [checkpoint_step(d) for d in dirs] == [2, 4] and all(verify_checkpoint(d) is None for d in dirs)

    (small_disk / "filler").unlink()  # the user frees space, then runs the printed command
    argv = shlex.split(command)
    resumed = subprocess.run(
        [sys.executable, "-m", "raydrat.cli", *argv[1:]],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed at step 4" in resumed.stdout + resumed.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    assert run.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == 8
