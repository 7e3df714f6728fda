"""What a run shows in MLflow (no Ray): the sections a run uses as params, source/git/user
tags, the experiment's kind, the data as dataset inputs, and artifact locations that stay
valid when the store is copied; and the Run handle as the one writer: every text redacted,
one client per store, the run's status read at checkpoints only. Read back through the
MLflow client from real SQLite stores."""

from __future__ import annotations

import ast
import json
import secrets
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydrat import tracking
from raydrat.bench.local import LocalData, LocalRun
from raydrat.config import load_config
from raydrat.core import metrics as M
from raydrat.core.fit import Callback, FitState
from raydrat.core.runtime import resolve
from raydrat.ray_train.callbacks import RunMetrics
from raydrat.redact import register
from raydrat.tracking import Run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One embedded store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("store")
    Run.start(f"sqlite:///{folder / 'mlruns.db'}", "raydrat", "first").end()
    return folder


def test_params_are_the_sections_a_run_uses():
    plain = tracking.run_params(load_config("debug"), resolve(load_config("debug"), gpus=0))
    assert plain["model.d_model"] == 64 and plain["recompute.mode"] == "none" and plain["slots.mode"] == "all"
    assert plain["runtime.device"] == "cpu" and plain["runtime.precision"] == "fp32"
    unused = (
        "sync.",
        "recompute.gates.",
        "recompute.budget_mb",
        "slots.keep",
        "tracking.",
        "precision.fallback_",
    )
    assert not [k for k in plain if k.startswith(unused)]
    assert len(plain) < len(load_config("debug").flat())
    gated = tracking.run_params(
        load_config("debug", ["recompute.mode=gated", "slots.mode=layerdrop", "scaling.num_workers=2"])
    )
    assert gated["recompute.gates.memory_weight"] == 0.01 and gated["slots.keep"] == 0.5
    assert gated["sync.mode"] == "ddp" and "tracking.experiment" not in gated


def test_a_copied_store_reads_and_writes_its_own_artifacts(store: Path, tmp_path: Path, monkeypatch):
    store = shutil.copytree(store, tmp_path / "store")
    uri = f"sqlite:///{store / 'mlruns.db'}"
    monkeypatch.chdir(tmp_path)  # not the store's folder: a worker's or a trial's cwd
    run = Run.start(uri, "raydrat", "r1", params={"a": 1})
    run.log_text("hello\n", "notes/hello.txt")
    run.end()
    with sqlite3.connect(store / "mlruns.db") as db:
        (location,) = db.execute("SELECT artifact_location FROM experiments WHERE name = 'raydrat'").fetchone()
    assert location == "mlartifacts"  # relative to the store
    assert (store / "mlartifacts" / run.run_id / "artifacts" / "notes" / "hello.txt").read_text() == "hello\n"

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shutil.rmtree(store)
    copy_uri = f"sqlite:///{copy / 'mlruns.db'}"
    again = Run.attach(copy_uri, run.run_id)
    again.log_text("more\n", "notes/more.txt")  # writes into the copy, not the original folder
    assert not store.exists()
    files = {a.path for a in tracking.artifact_repo(copy_uri, run.run_id).list_artifacts("notes")}
    assert files == {"notes/hello.txt", "notes/more.txt"}
    monkeypatch.chdir(copy)  # as `mlflow ui` runs: the command raydrat prints starts there
    assert tracking.ui_command(copy_uri).startswith(f"cd {copy} && ")
    client = MlflowClient(copy_uri)
    assert {a.path for a in client.list_artifacts(run.run_id, "notes")} == files
    exp = client.get_experiment_by_name("raydrat")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.raydrat"])  # the UI view raydrat links to
    assert view["selectedColumns"][:2] == ["metrics.`val_loss`", "metrics.`train_loss`"]
    assert tracking.ui_url(copy_uri, exp.experiment_id).endswith(
        f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=raydrat"
        "&compareRunsMode=CHART"
    )


def test_every_run_carries_source_git_and_user_tags(store: Path):
    uri = f"sqlite:///{store / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "r1")
    tags = MlflowClient(uri).get_run(run.run_id).data.tags
    head = subprocess.run(
        ["git", "-C", str(Path(tracking.__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]


def test_a_runs_deliveries_count_requests_refusals_and_failed_tries(store: Path, tmp_path):
    """What `raydrat bench tracking` reports of each writer: the requests the store took
    (consecutive steps of metrics as one), the records it refused, the tries that failed."""
    from raydrat.bench.loopback import free_port

    uri = f"sqlite:///{store / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "deliveries")
    for step in range(5):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step)
    run.log_params({"lr": 0.1})
    run.log_params({"lr": 0.2})  # a param never changes: the store refuses it
    assert run.close() == 0
    done = run.deliveries()
    assert 2 <= done.requests <= 6 and done.refused == 1 and done.failed == 0, done
    assert "param" in done.first_error.lower(), done.first_error
    assert [s for s, _ in run.metric_history("loss")] == [0, 1, 2, 3, 4]

    away = Run.attach(f"http://127.0.0.1:{free_port()}", "0" * 32, tmp_path / "backlog")
    away.log_metrics({"loss": 1.0}, 0)
    assert away.close(2.0) == 1  # kept in the backlog
    done = away.deliveries()
    assert done.requests == 0 and done.failed >= 1 and "Connection refused" in done.first_error, done
    assert Run.off().deliveries().requests == 0


def test_the_data_is_a_dataset_input_per_split(store: Path):
    lineage = {"kind": "sources", "sources": [{"path": "corpus/"}], "tokenizer_sha256": "ab", "seq_len": 64}
    inputs = tracking.data_inputs(lineage, {"docs": 10.0, "text_bytes": 1234.0})
    uri = f"sqlite:///{store / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "r2")
    run.log_inputs(inputs)
    logged = run.fetch().inputs.dataset_inputs  # read through the run: once its records are in
    assert {(i.dataset.name, i.tags[0].value) for i in logged} == {
        ("corpus:train", "training"),
        ("corpus:val", "validation"),
    }
    assert '"docs": 10' in logged[0].dataset.profile
    other = tracking.data_inputs({**lineage, "tokenizer_sha256": "cd"}, {})
    assert {i.dataset.digest for i in other}.isdisjoint({i.dataset.digest for i in inputs})


def test_logging_a_model_leaves_no_tracking_uri_for_child_processes(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; a model logged by raydrat must not
    leave it behind, or every later `raydrat` subprocess would log to that store instead."""
    import os

    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    run = Run.attach(uri, run_id)
    model_uri = run.log_model(torch.nn.Linear(2, 2), "model")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert str(run.register_model(model_uri, "reg")) == "1"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert client.get_run(run_id).info.status == "RUNNING"  # its status is left as it was


# ----------------------------------------------------------------------------- Run, the one writer


def test_every_text_a_run_writes_is_redacted(tmp_path, monkeypatch):
    """Tags (``set_tags`` too: trials' error text goes there), the command-line tag, the run
    name, params, text and file artifacts, dataset inputs and the experiment's view: a
    secret in any of them never reaches the store (its database and artifacts are grepped)."""
    secret = f"pw{secrets.token_hex(8)}"
    register(secret)
    server = f"http://ann:{secret}@mlflow.example:5000"
    monkeypatch.setattr(sys, "argv", ["raydrat", "train", "debug", "--set", f"tracking.tracking_uri={server}"])
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    run = Run.start(uri, "raydrat", f"run-{secret}", params={"tracking.tracking_uri": server}, tags={"n": secret})
    run.set_tags({"raydrat.error": f"ConnectionError: {server} refused", "raydrat.status": "failed"})
    run.set_tag("raydrat.note", secret)
    run.log_text(f"tracking_uri: {server}\n", "config.yaml")
    files = tmp_path / "files"
    files.mkdir()
    (files / "space.yaml").write_text(f"password: {secret}\n")
    (files / "plain.txt").write_text("nothing to hide\n")
    (files / "blob.bin").write_bytes(bytes(range(256)) * 4)
    run.log_artifact(files / "space.yaml", "space")
    run.log_artifact(files, "report")
    run.log_inputs(tracking.data_inputs({"kind": "sources", "sources": [{"path": f"s3://bucket/{secret}/"}]}, {}))
    run.share_view("mine", f"tags.`raydrat.note` = '{secret}'")
    run.end()

    back = MlflowClient(uri).get_run(run.run_id)
    assert back.data.tags["raydrat.error"] == "ConnectionError: http://ann:***@mlflow.example:5000 refused"
    assert back.data.tags["raydrat.note"] == "***" and back.info.run_name == "run-***"
    assert "http://ann:***@mlflow.example:5000" in back.data.tags[tracking.COMMAND_TAG]
    assert back.data.params["tracking.tracking_uri"] == "http://ann:***@mlflow.example:5000"
    artifacts = tmp_path / "store" / "mlartifacts" / run.run_id / "artifacts"
    assert (artifacts / "space" / "space.yaml").read_text() == "password: ***\n"
    assert (artifacts / "report" / "files" / "plain.txt").read_text() == "nothing to hide\n"
    assert (artifacts / "report" / "files" / "blob.bin").read_bytes() == (files / "blob.bin").read_bytes()
    assert secret in (files / "space.yaml").read_text()  # the user's own file is left as it was
    holding = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert holding == []


def test_one_client_per_store_across_many_calls(tmp_path, monkeypatch):
    made: list[str | None] = []
    real_init = MlflowClient.__init__

    def counting_init(self, tracking_uri=None, *args, **kwargs):
        made.append(tracking_uri)
        real_init(self, tracking_uri, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "__init__", counting_init)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "many", params={"a": 1})
    for step in range(25):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step)
    run.set_tags({"raydrat.status": "completed"})
    run.log_text("x\n", "notes/x.txt")
    again = Run.attach(uri, run.run_id)  # a worker, a resumed run: the same store
    assert len(again.metric_history("loss")) == 25 and again.status() == "RUNNING"
    again.end()
    assert made.count(uri) == 1


def test_the_run_status_is_read_at_checkpoints_and_at_the_end_not_at_every_log_step(store: Path, monkeypatch):
    """Rank 0's metrics callback reads whether the run is still open once per checkpoint
    step, counted as reads of the run from a real store; once the run is closed from
    outside (a sweep's driver closing a stopped trial's run), nothing more is logged from
    the next checkpoint on."""
    uri = f"sqlite:///{store / 'mlruns.db'}"
    cfg = load_config(
        "debug",
        ["train.steps=12", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1", "optim.warmup_steps=1"],
    )
    reads: list[str] = []
    real_get_run = MlflowClient.get_run

    def counting_get_run(self, run_id):
        reads.append(run_id)
        return real_get_run(self, run_id)

    monkeypatch.setattr(MlflowClient, "get_run", counting_get_run)
    run = Run.start(uri, "raydrat", "status-reads")
    LocalRun.start(cfg, LocalData.random(cfg, cfg.train.steps), [RunMetrics(run)]).run()
    assert [s for s, _ in run.metric_history(M.TRAIN_LOSS)] == list(range(1, 13))  # every log step logged
    assert reads.count(run.run_id) == 3  # the checkpoint steps 4, 8 and 12 (the last is the end)

    class CloseAt(Callback):  # the driver closing the run after step 5
        def on_step_end(self, state: FitState) -> None:
            if state.step == 5:
                Run.attach(uri, closed.run_id).end("FINISHED")

    closed = Run.start(uri, "raydrat", "closed-from-outside")
    LocalRun.start(cfg, LocalData.random(cfg, cfg.train.steps), [RunMetrics(closed), CloseAt()]).run()
    steps = [s for s, _ in closed.metric_history(M.TRAIN_LOSS)]
    assert steps[:5] == [1, 2, 3, 4, 5] and max(steps) < 8
    assert [s for s, _ in closed.metric_history(M.PEAK_MIB)] == [4]


def test_only_the_tracking_package_talks_to_mlflow():
    """Every write (and read) of the store goes through raydrat.tracking: no other module
    imports mlflow or the store's client."""
    package = Path(tracking.__file__).parent
    found = []
    for path in package.parent.rglob("*.py"):
        if path.is_relative_to(package):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            found += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] == "mlflow" or n.startswith("raydrat.tracking.store")
            ]
    assert found == []
