"""What a run shows in MLflow (no Ray): the sections a run uses as params, source/git/user
tags, the experiment's kind, the data as dataset inputs, and artifact locations that stay
valid when the store is copied; read back through the MLflow client."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydrat import tracking
from raydrat.config import load_config
from raydrat.core.runtime import resolve
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


def test_the_data_is_a_dataset_input_per_split(store: Path):
    lineage = {"kind": "sources", "sources": [{"path": "corpus/"}], "tokenizer_sha256": "ab", "seq_len": 64}
    inputs = tracking.data_inputs(lineage, {"docs": 10.0, "text_bytes": 1234.0})
    uri = f"sqlite:///{store / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "r2")
    run.log_inputs(inputs)
    logged = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
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
    model_uri = tracking.log_model(uri, run_id, torch.nn.Linear(2, 2), "model")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert str(tracking.register_model(uri, model_uri, "reg")) == "1"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert client.get_run(run_id).info.status == "RUNNING"  # its status is left as it was
