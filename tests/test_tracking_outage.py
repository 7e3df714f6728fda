"""Tracking never stops training: a store that cannot be reached (a closed loopback port, a
real `mlflow server` killed mid-run) costs the caller nothing; what the run writes waits on
disk in order and reaches the store exactly once when it answers again, its final status
last, whoever delivers it (the writer itself, the next command, `raydrat tracking sync`);
a run whose driver died is ended KILLED by the next command that touches it.

Real stores only: embedded SQLite, MLflow's file store (it keeps a metric row sent twice,
so a delivery that sent one twice would show) and `mlflow server` (raydrat/bench/mlflowserver.py)."""

from __future__ import annotations

import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import raydrat.tracking.delivery as D
import raydrat.tracking.journal as J
from raydrat.bench.loopback import MlflowServer, free_port
from raydrat.core import metrics as M
from raydrat.core.fit import Callback, FitState
from raydrat.tracking import Run
from raydrat.tracking.writer import writer

SECRET = f"pw{secrets.token_hex(8)}"

# the cue callbacks below travel to Ray workers by value (the workers cannot import the tests)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _closed_store() -> str:
    """A store URI nothing answers on (connection refused), with a password."""
    return f"http://ann:{SECRET}@127.0.0.1:{free_port()}"


def _files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow
def test_writes_to_an_unreachable_store_never_wait_and_wait_on_disk_in_order(tmp_path, capfd):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_id = Run.start(store, "raydrat", "r").run_id
    folder = tmp_path / "backlog"
    run = Run.attach(_closed_store(), run_id, folder)
    slowest = 0.0
    for step in range(300):
        t0 = time.perf_counter()
        run.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.5, f"a write waited {slowest:.3f}s on a store that is down"
    run.set_tags({"raydrat.status": "completed", "note": f"uri http://ann:{SECRET}@host"})
    run.log_text(f"password: {SECRET}\n", "notes/config.yaml")
    t0 = time.perf_counter()
    left = run.end("FINISHED")
    assert time.perf_counter() - t0 < 30  # a short timeout, then the backlog
    assert left == 300 + 3
    console = capfd.readouterr().err
    assert console.count("unreachable (Connection refused)") == 1, console
    assert console.count(f"wait in {folder}; `raydrat tracking sync {folder}` delivers them") == 1, console
    assert "its final status among them" in console

    [path] = J.journals(folder)
    journal = J.Journal.adopt(path)
    records = journal.pending()
    journal.close()
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert [r["metrics"][0][3] for r in records if r["op"] == "batch" and r["metrics"]] == list(range(300))
    assert records[-1]["op"] == "status" and records[-1]["status"] == "FINISHED" and records[-1]["ended"]
    assert J.describe(folder) == {
        "tracking_uri": f"http://ann:***@127.0.0.1:{run.uri.rsplit(':', 1)[1]}",
        "run_id": run_id,
    }
    assert _files_holding(folder, SECRET) == [] and SECRET not in console


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    """MLflow's file store: unlike its SQL stores it keeps an identical metric row twice."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path / 'mlruns'}"


def test_a_backlog_is_delivered_in_order_exactly_once_even_the_record_that_may_have_arrived(tmp_path, file_store):
    run_id = Run.start(file_store, "raydrat", "r").run_id
    folder = tmp_path / "backlog"
    down = Run.attach(_closed_store(), run_id, folder)
    for step in range(1, 11):
        down.log_metrics({M.TRAIN_LOSS: 1.0 / step, M.LR: 0.01}, step)
        down.set_tag("phase", f"after step {step}")
    down.log_text("hello\n", "notes/hello.txt")  # its copy waits in the backlog too
    assert down.end("FINISHED", end_time_s=1_700_000_000) == 22
    assert len(list((folder / J.FILES).glob("*/hello.txt"))) == 1

    # the first record was on its way when the store went away: it arrived, unacknowledged
    [path] = J.journals(folder)
    first = J.Journal.adopt(path)
    D.send(file_store, run_id, folder, first.next_pending())
    first.close()
    client = MlflowClient(file_store)
    assert len(client.get_metric_history(run_id, M.TRAIN_LOSS)) == 1

    run = Run.attach(file_store, run_id, folder)
    assert run.settle() == [f"delivered the 22 record(s) of MLflow run {run_id} kept in {folder}"]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    for key in (M.TRAIN_LOSS, M.LR):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, 11)), key
    back = client.get_run(run_id)
    assert back.data.tags["phase"] == "after step 10"  # in order: the last one written wins
    assert back.info.status == "FINISHED" and back.info.end_time == 1_700_000_000_000  # when it ended
    assert not folder.exists()
    assert run.settle() == []  # nothing twice


def test_a_file_staged_before_the_store_went_away_waits_in_the_backlog(tmp_path, file_store):
    """A file is copied for upload while the records still wait in memory (its copy in the
    writer's own temporary folder); the store is found away before its record is handed
    over, so the record goes straight to the journal: the copy goes with it into the backlog
    (the temporary folder is removed when the writer closes), and it is delivered later."""
    run_id = Run.start(file_store, "raydrat", "r").run_id
    folder = tmp_path / "backlog"
    note = tmp_path / "note.txt"
    note.write_text("kept\n")
    w = writer(_closed_store(), run_id, folder)
    staged = w.stage(note)
    assert Path(staged).is_absolute() and not folder.exists()  # in memory's staging: no backlog yet
    w.put(D.batch_record([Metric(M.TRAIN_LOSS, 1.0, 0, 1)]))
    w.flush(5)  # the first send fails: the records wait in the journal from now on
    assert w.down and J.journals(folder)
    w.put({"op": "upload", "file": staged, "artifact_path": "notes"})
    assert w.close(timeout=0.1) == 2
    [kept] = (folder / J.FILES).glob("*/note.txt")
    assert kept.read_text() == "kept\n"

    run = Run.attach(file_store, run_id, folder)
    assert run.settle() == [f"delivered the 2 record(s) of MLflow run {run_id} kept in {folder}"]
    assert [a.path for a in MlflowClient(file_store).list_artifacts(run_id, "notes")] == ["notes/note.txt"]


@pytest.mark.slow
def test_a_backlog_goes_at_the_pace_of_requests_not_of_steps(tmp_path, monkeypatch):
    """300 steps kept while the store was away reach it in one request (MLflow takes 1000
    metrics per request), counted at the real client."""
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_id = Run.start(store, "raydrat", "r").run_id
    down = Run.attach(_closed_store(), run_id, tmp_path / "backlog")
    for step in range(1, 301):
        down.log_metrics({M.TRAIN_LOSS: 1.0 / step, M.LR: 0.01}, step)
    down.close()
    requests: list[int] = []
    real_log_batch = MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), *args, **kwargs):
        requests.append(len(metrics))
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    run = Run.attach(store, run_id, tmp_path / "backlog")
    run.settle()
    assert requests == [600]
    assert [s for s, _ in run.metric_history(M.TRAIN_LOSS)] == list(range(1, 301))


@pytest.mark.slow
def test_tracking_sync_says_in_one_line_what_it_needs(tmp_path, capsys, monkeypatch):
    from raydrat.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def error(*argv: str) -> str:
        assert main(["tracking", "sync", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("raydrat: error:") == 1 and err.startswith("raydrat: error:"), err
        return err

    assert "no run there" in error("nope", "--storage", str(tmp_path))
    folder = tmp_path / "r" / J.BACKLOG_DIR
    closed = _closed_store()
    down = Run.attach(closed, "0123abcd", folder)
    down.log_metrics({"loss": 1.0}, 1)
    down.close()
    capsys.readouterr()
    assert "whose password is not kept" in error("r", "--storage", str(tmp_path))
    err = error("r", "--storage", str(tmp_path), "--tracking-uri", closed)
    assert "unreachable (Connection refused)" in err and f"the backlog stays in {folder}" in err
    assert SECRET not in err and J.count_pending(folder) == 1


DRIVER = """
import sys, time
from raydrat.tracking import Run
run = Run.start(sys.argv[1], "raydrat", "driver", backlog=sys.argv[2])
run.claim()
run.log_metrics({"loss": 1.0}, 1)
run.close()
print(run.run_id, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_run_whose_driver_died_is_ended_killed_by_the_next_command(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    folder = tmp_path / "run" / "tracking-backlog"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, store, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        run_id = driver.stdout.readline().strip()
        assert run_id, "the driver did not start its run"
        run = Run.attach(store, run_id, folder)
        assert run.settle() == [] and run.status() == "RUNNING"  # its driver lives: left alone
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    assert run.status() == "RUNNING"
    assert run.settle() == [f"MLflow run {run_id} was left RUNNING by a driver that is gone: now KILLED"]
    assert run.status() == "KILLED" and not folder.exists()
    assert run.metric_history("loss") == [(1, 1.0)]


def test_a_record_the_store_refuses_is_dropped_with_one_line(tmp_path, capfd):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = Run.start(store, "raydrat", "r", params={"lr": 0.1})
    run.log_params({"lr": 0.2})  # MLflow refuses to change a param
    run.log_metrics({"loss": 1.0}, 1)  # and goes on with the next record
    assert run.metric_history("loss") == [(1, 1.0)]
    assert run.end() == 0
    err = capfd.readouterr().err
    assert err.count("MLflow refused a batch record of run") == 1, err
    assert run.fetch().data.params["lr"] == "0.1"


# ----------------------------------------------------------------------------- real server, real runs


class Cue(Callback):
    """Rank 0 marks each step's end time in ``folder/steps`` and, at the steps in
    ``waits``, writes ``folder/at-<step>`` and waits for ``folder/go-<step>``: the test acts
    on the server at known steps (training itself never waits on the store)."""

    def __init__(self, folder: str, waits: tuple[int, ...]):
        self.folder, self.waits = folder, waits

    def on_step_end(self, state: FitState) -> None:
        if state.rank != 0:
            return
        with open(os.path.join(self.folder, "steps"), "a") as f:
            f.write(f"{state.step} {time.time()}\n")
        if state.step in self.waits:
            Path(self.folder, f"at-{state.step}").touch()
            while not Path(self.folder, f"go-{state.step}").exists():
                time.sleep(0.05)


def _when(folder: Path, name: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not (folder / name).exists():
        assert time.monotonic() < deadline, f"training never reached {name}"
        time.sleep(0.1)


def _step_times(folder: Path) -> dict[int, float]:
    return {int(s): float(t) for s, t in (line.split() for line in (folder / "steps").read_text().splitlines())}


def _overrides(tmp_path: Path, demo_dir: Path, uri: str, steps: int) -> list[str]:
    settings = {
        "data.demo_dir": demo_dir,
        "train.steps": steps,
        "train.log_every": 1,
        "train.eval_every": 10,
        "train.eval_batches": 1,
        "optim.warmup_steps": 1,
        "scaling.cpus_per_worker": 0.5,
        "train.storage_path": tmp_path / "ray_results",
        "tracking.tracking_uri": uri,
        "tracking.run_name": "outage",
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _only_once(client: MlflowClient, run_id: str, steps: int) -> dict[str, list[int]]:
    """Each metric's steps, checked to hold no step twice; train_loss every step once."""
    run = client.get_run(run_id)
    history = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    assert sorted(history[M.TRAIN_LOSS]) == list(range(1, steps + 1))
    assert {k: v for k, v in history.items() if len(v) != len(set(v))} == {}
    return history


@pytest.mark.slow
def test_a_server_killed_and_restarted_mid_run_costs_training_nothing_and_loses_nothing(
    ray_local, tmp_path, demo_dir, capfd, monkeypatch
):
    from raydrat.config import load_config
    from raydrat.ray_train.trainer import run_training

    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server").start()
    uri = server.url.replace("://", f"://ann:{SECRET}@")
    cues = tmp_path / "cues"
    cues.mkdir()
    steps, kill_at, back_at = 45, 10, 30
    times: dict[str, float] = {}

    def outage() -> None:  # the server dies after step 10 and is back (restarted) before step 31
        _when(cues, f"at-{kill_at}")
        server.kill()
        times["killed"] = time.time()
        (cues / f"go-{kill_at}").touch()
        _when(cues, f"at-{back_at}")
        times["restarting"] = time.time()
        server.start()
        times["back"] = time.time()
        (cues / f"go-{back_at}").touch()

    conductor = threading.Thread(target=outage, daemon=True)
    conductor.start()
    try:
        cfg = load_config("debug", _overrides(tmp_path, demo_dir, uri, steps))
        summary = run_training(cfg, fit_callbacks=[Cue(str(cues), (kill_at, back_at))])
        conductor.join(timeout=60)
        client = MlflowClient(uri)
        run = client.get_run(summary.run.run_id)
        assert run.info.status == "FINISHED"
        _only_once(client, run.info.run_id, steps)
    finally:
        server.stop()

    # the steps during the outage came at the pace of the others (the gates' waits left out)
    at = _step_times(cues)
    took = {s: at[s] - at[s - 1] for s in at if s - 1 in at and s - 1 not in (kill_at, back_at)}
    assert times["killed"] < at[kill_at + 1] and at[back_at] < times["restarting"]
    during = statistics.median(took[s] for s in took if kill_at < s <= back_at)
    others = statistics.median(took[s] for s in took if s > 2 and not kill_at < s <= back_at)
    console = capfd.readouterr()
    text = console.out + console.err
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len  # a step, one worker
    parts = {"before": (2, kill_at), "during": (kill_at, back_at), "after": (back_at, steps)}
    for name, (lo, hi) in parts.items():  # shown with pytest -rP: the table of the closing note
        median = statistics.median(took[s] for s in took if lo < s <= hi)
        print(f"{name} the outage (steps {lo + 1}-{hi}): {median:.3f} s/step, {tokens / median:,.0f} tokens/s")
    print(f"during/others: {during / others:.2f} (load average {os.getloadavg()})")
    assert during < 3 * others + 0.05, f"a step took {during:.3f}s during the outage, {others:.3f}s otherwise"
    assert len(re.findall(r"unreachable \([^)]+\): the records of run", text)) == 1, text  # refused, reset...
    assert text.count("reachable again after") == 1, text
    assert SECRET not in text and _files_holding(tmp_path / "ray_results", SECRET) == []
    assert not (tmp_path / "ray_results" / "outage" / J.BACKLOG_DIR).exists()


@pytest.mark.slow
def test_a_server_down_through_the_end_leaves_a_backlog_that_a_later_command_delivers(
    ray_local, tmp_path, demo_dir, capfd, monkeypatch
):
    """Down from step 5 on: the run ends normally (the CLI would exit 0 and print these
    lines), says where its backlog is, and `raydrat tracking sync` delivers it later."""
    from raydrat.cli import main
    from raydrat.config import load_config
    from raydrat.ray_train.trainer import run_training

    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server").start()
    uri = server.url.replace("://", f"://ann:{SECRET}@")
    steps = 15
    cues = tmp_path / "cues"
    cues.mkdir()

    def outage() -> None:
        _when(cues, "at-5")
        server.kill()
        (cues / "go-5").touch()

    threading.Thread(target=outage, daemon=True).start()
    try:
        summary = run_training(
            load_config("debug", _overrides(tmp_path, demo_dir, uri, steps)), fit_callbacks=[Cue(str(cues), (5,))]
        )
        for line in summary.lines():
            print(line)
    finally:
        server.kill()
    backlog = tmp_path / "ray_results" / "outage" / J.BACKLOG_DIR
    console = capfd.readouterr()
    text = console.out + console.err
    assert f"`raydrat tracking sync {backlog}` delivers them" in text, text
    assert "its final status among them" in text
    assert J.count_pending(backlog) > steps
    assert _files_holding(tmp_path, SECRET) == [] and SECRET not in text

    server.start()
    storage = str(tmp_path / "ray_results")
    try:
        assert main(["tracking", "sync", "outage", "--storage", storage, "--tracking-uri", uri]) == 0
        out = capfd.readouterr().out
        assert "delivered the" in out and not backlog.exists(), out
        client = MlflowClient(uri)
        run = client.get_run(summary.run.run_id)
        assert run.info.status == "FINISHED"
        _only_once(client, run.info.run_id, steps)
        assert "model" in Run.attach(uri, run.info.run_id).logged_models()
        assert main(["tracking", "sync", "outage", "--storage", storage]) == 0
        assert "nothing waits for MLflow" in capfd.readouterr().out
    finally:
        server.stop()
