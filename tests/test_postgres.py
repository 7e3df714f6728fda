"""MLflow on PostgreSQL, against a real server started for the session (conftest's
``postgres``: Debian's binaries in a temp dir, a password login over TCP).

A store that is down, refuses the password or lacks the database is one line naming the
host (never the password) before any work; a missing driver is one line naming the package;
the printed ``mlflow ui`` command serves (one worker); and a sweep whose trials run at once
logs every trial into the store, its lineage (the data's dataset inputs and per-epoch counts)
queryable with SQL, and no password anywhere it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, raydrat_cmd, run_cli
from envs import bare_python
from mlflow.tracking import MlflowClient

from raydrat import tracking
from raydrat.bench.loopback import free_port
from raydrat.config import load_config

FIX = "check that the server is up and reachable from here"


def _only_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", ["down", "wrong password", "no such database"])
def test_a_store_that_cannot_be_logged_in_to_is_one_line_naming_the_host_before_any_work(postgres, tmp_path, case):
    uri = {
        "down": f"postgresql://{postgres.user}:{postgres.password}@127.0.0.1:{free_port()}/mlflow",
        "wrong password": postgres.uri(password="not-the-password-42", driver="postgresql"),
        "no such database": postgres.uri(driver="postgresql").replace("/mlflow", "/nosuchdb"),
    }[case]
    port = uri.rsplit(":", 1)[1].split("/")[0]
    t0 = time.monotonic()
    proc = run_cli(["train", "debug", "--set", f"tracking.tracking_uri={uri}"], cwd=tmp_path, timeout=300)
    line = _only_error_line(proc)
    assert line.startswith("raydrat: error: tracking.tracking_uri: cannot log in to the PostgreSQL store at ")
    assert f"127.0.0.1:{port}" in line and FIX in line, line
    expected = {"down": "Connection refused", "wrong password": "password authentication failed",
                "no such database": 'database "nosuchdb" does not exist'}[case]  # fmt: skip
    assert expected in line, line
    assert postgres.password not in proc.stdout + proc.stderr and "not-the-password-42" not in line
    assert list(tmp_path.iterdir()) == []  # before any work: no corpus, no store, no ray_results
    print(f"{case}: refused in {time.monotonic() - t0:.1f}s: {line}")


@pytest.mark.slow
def test_a_sweep_with_the_store_in_the_environment_is_refused_the_same_way(postgres, tmp_path):
    uri = postgres.uri(password="not-the-password-42", driver="postgresql")
    proc = run_cli(["tune", "smoke"], cwd=tmp_path, timeout=300, env={"MLFLOW_TRACKING_URI": uri})
    line = _only_error_line(proc)
    assert line.startswith("raydrat: error: $MLFLOW_TRACKING_URI: cannot log in to the PostgreSQL store at 127.0.0.1:")
    assert "not-the-password-42" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []


def test_a_store_that_went_away_is_unreachable_at_once_not_after_mlflows_retries():
    """MLflow tries ten times to open a database store, its back-off sleeps adding up to about
    100 s: a run (a sweep's trial, a resume) whose PostgreSQL server went away since it was
    checked says so at once (its writer retries on its own thread)."""
    uri = f"postgresql+psycopg://raydrat:pw@127.0.0.1:{free_port()}/mlflow"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match="unreachable.*Connection refused"):
        tracking.Run.start(uri, "gone", "trial")
    assert time.monotonic() - t0 < 10


def test_without_a_driver_the_store_is_refused_naming_the_package(tmp_path, postgres):
    """An environment without psycopg (and psycopg2): one line naming what to install."""
    py = bare_python(tmp_path / "env", without=("raydrat", "psycopg"))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "raydrat.cli",
            "train",
            "debug",
            "--set",
            f"tracking.tracking_uri={postgres.uri(driver='postgresql')}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert _only_error_line(proc) == (
        "raydrat: error: tracking.tracking_uri is a PostgreSQL store but no PostgreSQL driver is installed: "
        "pip install 'raydrat[postgres]' (psycopg)"
    )


def _serve(command: str, port: int, log: Path) -> subprocess.Popen:
    """The printed command, on a free port instead of 5000 (a shared machine)."""
    assert command.count("--port 5000") == 1, command
    return subprocess.Popen(
        command.replace("--port 5000", f"--port {port}"),
        shell=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PGPASSWORD": os.environ.get("PGPASSWORD", "")},
    )


@pytest.mark.slow  # two MLflow UIs start (tens of seconds each on a loaded machine)
def test_the_printed_mlflow_ui_command_serves_with_one_worker(postgres, tmp_path, monkeypatch):
    """`raydrat train` prints how to browse its store; that command, run as printed (on
    another port), serves the run: SQLite in the store's folder, and PostgreSQL with the
    password from PGPASSWORD (the printed command holds none)."""
    sqlite_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    pg_uri = tracking.resolve_tracking_uri(load_config("debug", [f"tracking.tracking_uri={postgres.uri()}"]).tracking)
    for uri in (sqlite_uri, pg_uri):
        run = tracking.Run.start(uri, "ui-check", "browse-me")
        run.end()
        command = tracking.ui_command(uri)
        assert "--workers 1" in command and postgres.password not in command
        if uri == pg_uri:
            assert command.endswith("(with PGPASSWORD set)")
            command = command.removesuffix(" (with PGPASSWORD set)")
            monkeypatch.setenv("PGPASSWORD", postgres.password)
        port = free_port()
        proc = _serve(command, port, tmp_path / f"ui-{port}.log")
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    body = json.dumps({"experiment_ids": [run.experiment_id()]}).encode()
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    )
                    runs = json.loads(urllib.request.urlopen(req, timeout=5).read())["runs"]
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / f"ui-{port}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "mlflow ui did not serve in 240 s"
                    time.sleep(1)
            assert [r["info"]["run_name"] for r in runs] == ["browse-me"]
            print(f"served: {command}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def test_a_dataset_another_writer_creates_at_the_same_moment_is_linked_not_refused(postgres, capfd):
    """Two trials log their common corpus at once: each looks the dataset up, finds none and
    inserts it; the second INSERT waits on the first writer's open transaction, then violates
    the dataset's key. Played here deterministically: the other writer is a transaction of our
    own holding the same dataset row uncommitted while the run's writer inserts it, committed
    once the run's INSERT waits on it. The run's input is linked to that dataset, at once,
    with no line saying the store is unreachable."""
    import psycopg
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run = tracking.Run.start(postgres.uri(), "pg-dataset-race", "racer")
    dataset = Dataset("corpus", "d1g3st", "local", '{"uris": ["/data/corpus"]}', None, '{"docs": 8}')
    other = psycopg.connect(postgres.uri(driver="postgresql"))
    try:
        other.execute(
            "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type, dataset_source, "
            "dataset_profile) VALUES ('0ther', %s, %s, %s, %s, %s, %s)",
            (
                int(run.experiment_id()),
                dataset.name,
                dataset.digest,
                dataset.source_type,
                dataset.source,
                dataset.profile,
            ),
        )  # uncommitted: the run's writer does not see it, and its INSERT of the same key waits on it
        t0 = time.monotonic()
        run.log_inputs([DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO datasets%'"
        while postgres.psql(waiting, database=postgres.database).strip() != "1":
            assert time.monotonic() - t0 < 60, "the run's writer never reached its INSERT of the dataset"
            time.sleep(0.05)
        other.commit()  # the other writer's dataset exists now: the run's INSERT violates its key
    finally:
        other.close()
    assert run.end() == 0  # delivered, nothing left in a backlog
    linked = run.fetch().inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.dataset.profile) for i in linked] == [
        ("corpus", "d1g3st", '{"docs": 8}')
    ]
    rows = postgres.psql(
        f"SELECT d.dataset_uuid FROM inputs i JOIN datasets d ON d.dataset_uuid = i.source_id "
        f"WHERE i.destination_id = '{run.run_id}'",
        database=postgres.database,
    )
    assert rows.split() == ["0ther"]  # the other writer's dataset, one row of it
    err = capfd.readouterr().err
    assert "unreachable" not in err and "refused" not in err, err


def _sql_json(postgres, query: str):
    out = postgres.psql(query, database=postgres.database).strip()
    return json.loads(out) if out else None


@pytest.mark.slow
def test_a_sweep_logs_its_concurrent_trials_into_mlflow_on_postgresql(postgres, demo_dir, tmp_path):
    """`raydrat tune` with MLFLOW_TRACKING_URI=postgresql://user:pass@host/db (the plain form,
    no driver named), two trials at once: the parent and both children in the store, their
    metric histories whole, their times overlapping; the lineage (dataset inputs with the
    data counts, per-epoch counts) read back with SQL; the password nowhere it wrote."""
    uri = postgres.uri(driver="postgresql")
    # a corpus small enough (about 36 train blocks) that 16 steps of 4 blocks read it whole at
    # least once: an epoch counts once every unit of it was read whole
    texts = pq.read_table(demo_dir / "corpus" / "part-00000.parquet").column("text").to_pylist()
    docs = [t[:600] for t in texts if len(t) >= 600][:8]
    part = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"text": docs}), part)
    space = {
        "name": "pgsweep",
        "base": "debug",
        "overrides": {
            "train.steps": 16,
            "train.eval_every": 8,
            "train.log_every": 8,
            "train.eval_batches": 1,
            "train.batch_size": 4,
            "optim.warmup_steps": 2,
            "scaling.cpus_per_worker": 0.25,
            "data.sources": [{"path": str(part)}],
            "data.val_fraction": 0.25,
            "data.tokenizer_path": str(demo_dir / "tokenizer-512.json"),
            "tracking.experiment": "pg-sweep",
        },
        "space": {"optim.lr": {"grid": [1e-3, 3e-3]}},
        "metric": "val_loss",
        "mode": "min",
        "max_concurrent": 2,
        "scheduler": {"type": "none"},  # both train to the end: each writes its whole lineage
        "resources": {"trial_cpu": 0.1},
    }
    (tmp_path / "pgsweep.yaml").write_text(yaml.safe_dump(space))
    print("$ MLFLOW_TRACKING_URI=postgresql://raydrat:***@127.0.0.1:PORT/mlflow raydrat tune pgsweep.yaml")
    proc = subprocess.run(
        raydrat_cmd("tune", "pgsweep.yaml", "--json", "sweep.json"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "MLFLOW_TRACKING_URI": uri},
    )
    console = proc.stdout + proc.stderr
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, console[-6000:]

    client = MlflowClient(tracking_uri=postgres.uri())
    exp = client.get_experiment_by_name("pg-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert "unreachable" not in console and "MLflow refused" not in console, console[-6000:]
    for child in children:  # every metric the trial logged is there
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [8, 16]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [8, 16]
    starts = [c.info.start_time for c in children]
    ends = [c.info.end_time for c in children]
    assert max(starts) < min(ends), "the two trials did not run at once"

    # the lineage, queried from the store with SQL: the data as dataset inputs (their
    # profile holds the data counts) and the per-epoch counts
    inputs = _sql_json(
        postgres,
        "SELECT json_agg(json_build_object('run', r.name, 'context', t.value, 'source', d.dataset_source, "
        "'profile', d.dataset_profile)) FROM runs r JOIN inputs i ON i.destination_id = r.run_uuid "
        "JOIN datasets d ON d.dataset_uuid = i.source_id "
        "JOIN input_tags t ON t.input_uuid = i.input_uuid AND t.name = 'mlflow.data.context' "
        f"WHERE r.experiment_id = {int(exp.experiment_id)}",  # the store is shared with other tests
    )
    names = {c.info.run_name for c in children}
    assert {(x["run"], x["context"]) for x in inputs} == {(n, c) for n in names for c in ("training", "validation")}
    for x in inputs:
        assert json.loads(x["source"])["uris"] == [str(part)]
        assert json.loads(x["profile"])["docs"] > 0
    epochs = _sql_json(
        postgres,
        "SELECT json_agg(json_build_object('run', r.name, 'epochs', t.value)) FROM runs r "
        "JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'raydrat.data.epochs' "
        f"AND r.experiment_id = {int(exp.experiment_id)}",
    )
    assert epochs and {x["run"] for x in epochs} == names, (epochs, names, console[-3000:])
    for x in epochs:  # each epoch read every document of the file once
        counts = json.loads(x["epochs"])
        assert counts and all(e["data_epoch_docs"] == len(docs) and e["data_epoch_blocks"] > 0 for e in counts), counts
    print(f"lineage rows: {len(inputs)} dataset inputs, {len(epochs)} runs with per-epoch counts")

    # no password in what the sweep wrote: the console, ray_results, the store itself
    assert postgres.password not in console
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if postgres.password.encode() in p.read_bytes()]
    assert "postgresql+psycopg://raydrat:***@127.0.0.1" in console or "MLflow parent run" in console
    assert postgres.password not in postgres.dump()
