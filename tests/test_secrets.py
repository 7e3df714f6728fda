"""Secrets never land in anything written: a tracking URI with a password (`raydrat train`
with `tracking.tracking_uri`, `raydrat tune` with `$MLFLOW_TRACKING_URI`) against a real
`mlflow server` on loopback, and AWS keys in the environment. The test then greps the
server's store and artifacts, ray_results (checkpoints, raydrat_run.json, Tune's trial
params/results and experiment state), Ray's session logs and the console for the secret
strings (the `raydrat.command` tag holds the command line that named the URI). Plus the
redaction functions themselves."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

from raydrat import redact as R
from raydrat.bench.loopback import MlflowServer

SECRET = f"pw{secrets.token_hex(8)}"
AWS_SECRET = f"aws{secrets.token_hex(10)}"


def test_redaction_masks_uri_passwords_and_known_secrets(monkeypatch):
    assert R.redact_uri("http://ann:s3cr%40t@host:5000/x") == "http://ann:***@host:5000/x"
    assert R.redact_uri("http://host:5000/path@x") == "http://host:5000/path@x"  # no user info
    assert R.redact_uri("sqlite:////tmp/mlruns.db") == "sqlite:////tmp/mlruns.db"
    # a PostgreSQL store (the form raydrat rewrites it to, the driver named, too)
    assert (
        R.redact_uri("postgresql://ann:s3cr3t@db.internal:5432/mlflow")
        == "postgresql://ann:***@db.internal:5432/mlflow"
    )
    assert (
        R.redact_uri("postgresql+psycopg://ann:s3cr3t@db:5432/mlflow") == "postgresql+psycopg://ann:***@db:5432/mlflow"
    )
    assert R.redact("store postgresql://ann:s3cr3t@db/mlflow failed") == "store postgresql://ann:***@db/mlflow failed"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENG")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter2hunter2@mlflow.example")
    text = "key wJalrXUtnFEMIK7MDENG, uri https://bob:hunter2hunter2@mlflow.example, raw hunter2hunter2"
    assert R.redact(text) == "key ***, uri https://bob:***@mlflow.example, raw ***"
    nested = {"tracking": {"tracking_uri": "http://u:pw123456@h"}, "l": ["wJalrXUtnFEMIK7MDENG", 3]}
    assert R.redact_obj(nested) == {"tracking": {"tracking_uri": "http://u:***@h"}, "l": ["***", 3]}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    assert R.describe_aws_credentials() == "access key id AKIA…MPLE from AWS_ACCESS_KEY_ID"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own store and artifact root; clients
    reach it as http://raydrat:SECRET@127.0.0.1:PORT (the password travels as basic auth)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield {"root": server.root, "uri": server.url.replace("://", f"://raydrat:{SECRET}@")}
    server.stop()


@pytest.fixture(scope="module")
def ray_with_secrets_in_env():
    """Ray started from an environment holding AWS keys, as a user with them exported."""
    import ray

    from raydrat.ray_session import ensure_ray

    assert not ray.is_initialized()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="AKIATESTRAYDRAT0001", AWS_SECRET_ACCESS_KEY=AWS_SECRET)
    ensure_ray(num_cpus=2)
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    yield session
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _files_holding(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits = [n.decode() for n in needles if n in data]
            if hits:
                found[str(p)] = hits
    return found


@pytest.mark.slow
def test_no_secret_in_the_store_artifacts_ray_results_session_logs_or_console(
    mlflow_server, ray_with_secrets_in_env, demo_dir, tmp_path, capfd, monkeypatch
):
    from mlflow.tracking import MlflowClient
    from test_tune import _space

    from raydrat.cli import main
    from raydrat.tracking import COMMAND_TAG

    monkeypatch.chdir(tmp_path)
    uri = mlflow_server["uri"]
    train_args = [
        "train",
        "debug",
        "--set",
        f"data.demo_dir={demo_dir}",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "optim.warmup_steps=1",
        "--set",
        "scaling.cpus_per_worker=0.5",
        "--set",
        f"train.storage_path={tmp_path / 'ray_results'}",
        "--set",
        f"tracking.tracking_uri={uri}",
    ]
    # the command line as a user types it: the run's `raydrat.command` tag records it
    monkeypatch.setattr(sys, "argv", ["raydrat", *train_args])
    assert main(train_args) == 0
    space = _space(
        tmp_path,
        name="secret",
        max_concurrent=1,
        scheduler={"type": "none"},
        overrides={
            "train.steps": 4,
            "train.eval_every": 2,
            "train.log_every": 2,
            "train.eval_batches": 1,
            "optim.warmup_steps": 1,
            "scaling.cpus_per_worker": 0.25,
            "data.demo_dir": str(demo_dir),
        },
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "argv", ["raydrat", "tune", str(space)])
    assert main(["tune", str(space)]) == 0
    console = capfd.readouterr()
    console_text = console.out + console.err

    # the credentials were used: every run is on the server, finished, with metrics
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    trained = [r for r in runs if "val_loss" in r.data.metrics]
    assert len(trained) == 2
    # the command line is there, its password masked (the grep below reads the database's bytes)
    commands = [r.data.tags[COMMAND_TAG] for r in runs]
    assert any(f"tracking.tracking_uri={R.redact_uri(uri)}" in c for c in commands), commands
    # the URI is a param only where it is recorded at all, and then masked
    assert {r.data.params.get("tracking.tracking_uri") for r in trained} <= {None, R.redact_uri(uri)}

    needles = [SECRET.encode(), AWS_SECRET.encode()]
    places = {
        "the MLflow server's store and artifacts": mlflow_server["root"],
        "ray_results (checkpoints, run records, Tune's trials and state)": tmp_path,
        "Ray's session directory (logs)": ray_with_secrets_in_env,
    }
    leaks = {name: _files_holding(root, needles) for name, root in places.items()}
    assert leaks == {name: {} for name in places}, leaks
    assert SECRET not in console_text and AWS_SECRET not in console_text
    # the grep finds what is there: the masked URI is in the store, the trial state exists
    assert _files_holding(mlflow_server["root"], [R.redact_uri(uri).encode()])
    assert list(tmp_path.rglob("params.json")) and list(tmp_path.rglob("experiment_state-*.json"))
    assert list(tmp_path.rglob("state.pt")) and list(tmp_path.rglob("raydrat_run.json"))
    assert "raydrat:***@127.0.0.1" in console_text


def test_the_run_record_keeps_no_password_and_resume_asks_for_it(tmp_path):
    import json

    from raydrat.config import ConfigError, load_config
    from raydrat.ray_train import resume

    uri = "http://ann:hunter2hunter2@127.0.0.1:5000"
    cfg = load_config("debug", [f"train.storage_path={tmp_path}", f"tracking.tracking_uri={uri}"])
    path = resume.write_run_record(cfg, "r", uri, "abc")
    text = path.read_text()
    assert "hunter2hunter2" not in text and "http://ann:***@127.0.0.1:5000" in text
    record = json.loads(text)
    assert resume.tracking_uri_for(record, uri) == uri  # the same server and user: the given URI
    assert resume.config_differences(record["config"], cfg) == []  # a masked value is no difference
    with pytest.raises(ConfigError, match=r"tracked at http://ann:\*\*\*@127.0.0.1:5000.*with its password"):
        resume.tracking_uri_for(record, "sqlite:///mlruns.db")
