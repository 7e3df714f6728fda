"""MLflow tracking: the embedded default store, and the :class:`Run` handle.

The default store is an SQLite file in the working directory (``sqlite:///mlruns.db``) with
artifacts in ``mlartifacts/`` beside it; any other URI (an ``mlflow server``) comes from
``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``. The driver creates the run and logs
params and artifacts; the training worker of rank 0 logs metrics into that run by id.

Everything goes through a :class:`Run`: ``Run.start(...)`` creates one, ``Run.attach(uri,
run_id)`` reopens one (a worker, a resumed run), and ``Run.off()`` is the run of an
untracked job, whose every method does nothing, so callers never test whether tracking is
on. A ``Run`` pickles as its ``(uri, run_id)``, so it can be handed to Ray workers.
Nothing here runs at import time.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from raydrat.config.tracking import TrackingConfig
from raydrat.redact import redact, redact_uri, register, uri_password

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: config, then ``$MLFLOW_TRACKING_URI``, then the embedded
    SQLite file (made absolute so Ray workers with another cwd write to the same store).
    A password in the URI is registered as a secret (:mod:`raydrat.redact`)."""
    if cfg.tracking_uri:
        register(uri_password(cfg.tracking_uri))
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        register(uri_password(env))
        return env
    base = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def ui_command(uri: str) -> str:
    """The exact command that browses this store (never with its password)."""
    if is_embedded(uri):
        db = uri.removeprefix("sqlite:///")
        exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        return f"{exe} ui --backend-store-uri sqlite:///{db} --port 5000"
    return f"open {redact_uri(uri)} in a browser"


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``; with the embedded store, artifacts go to
    ``mlartifacts/`` beside the database."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_embedded(uri):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` if given) and log its params."""
    c = client(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return redact(text)[:MAX_PARAM_LEN]


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, redact(text), artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    if not uri_password(uri):
        client(uri).set_terminated(run_id, status=status)
        return
    # MLflow prints the run's URL, password included, when a run on a server ends: not that one
    key, saved = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    os.environ[key] = "true"
    try:
        client(uri).set_terminated(run_id, status=status)
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved



def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


class Run:
    """One MLflow run, or none (``Run.off()``: every method is a no-op)."""

    def __init__(self, uri: str | None = None, run_id: str | None = None):
        self.uri, self.run_id = (uri, run_id) if uri and run_id else (None, None)

    @classmethod
    def off(cls) -> "Run":
        return cls()

    @classmethod
    def attach(cls, uri: str | None, run_id: str | None) -> "Run":
        return cls(uri, run_id)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent: "Run | None" = None) -> "Run":
        parent_id = parent.run_id if parent is not None else None
        return cls(uri, start_run(uri, experiment, run_name, params, tags, parent_id))

    def __bool__(self) -> bool:
        return self.run_id is not None

    def __reduce__(self):
        return (Run, (self.uri, self.run_id))

    def __repr__(self) -> str:
        return f"Run({self.run_id})" if self else "Run.off()"

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self:
            log_params(self.uri, self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self:
            log_metrics(self.uri, self.run_id, metrics, step)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self:
            log_text(self.uri, self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self:
            log_artifact(self.uri, self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self:
            client(self.uri).set_tag(self.run_id, key, redact(str(value)))


    def set_status(self, status: str) -> None:
        """``RUNNING`` again (a resumed run)."""
        if self:
            client(self.uri).update_run(self.run_id, status=status)

    def end(self, status: str = "FINISHED") -> None:
        if self:
            end_run(self.uri, self.run_id, status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return metric_history(self.uri, self.run_id, key) if self else []
