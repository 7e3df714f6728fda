"""The MLflow store a run logs to: its URI, how to browse it, one client per store,
experiments and artifact locations.

The default store is an SQLite file in the working directory (``sqlite:///mlruns.db``) with
artifacts in ``mlartifacts/`` beside it; any other URI (an ``mlflow server``) comes from
``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``. In the embedded store the artifact
location is ``mlartifacts`` *relative to the store*, so a copied ``mlruns.db`` +
``mlartifacts/`` stays whole: raydrat resolves it against the database's folder, and
``mlflow ui`` started in that folder (:func:`ui_command`) reads it there.

:func:`client` is this package's own: the rest of raydrat logs and reads through
:class:`raydrat.tracking.run.Run`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import shutil
import sqlite3
import sys
from pathlib import Path
from urllib.parse import urlparse

import mlflow.store.db.utils as mlflow_db
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from raydrat import tracking_store
from raydrat.config.tracking import TrackingConfig
from raydrat.redact import redact, redact_uri, remember_uri
from raydrat.tracking.views import VIEW_KEY, VIEW_TAG, view_state

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag that marks the experiment as model training (runs, metric charts)
rather than GenAI (traces): what MLflow UIs that read it open on. The 3.x UI picks its view
from the page's ``workflowType`` instead (else the browser's last choice, GenAI at first):
every page raydrat prints carries :data:`TRAINING_VIEW`."""
TRAINING_VIEW = "workflowType=machine_learning"


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: config, then ``$MLFLOW_TRACKING_URI``, then the embedded
    SQLite file (made absolute so Ray workers with another cwd write to the same store).
    A password in the URI is registered as a secret (:mod:`raydrat.redact`); a PostgreSQL
    store gets its driver and is checked once (:func:`raydrat.tracking_store.ready`)."""
    if cfg.tracking_uri:
        remember_uri(cfg.tracking_uri)
        return tracking_store.ready(cfg.tracking_uri, "tracking.tracking_uri")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        remember_uri(env)
        return tracking_store.ready(env, "$MLFLOW_TRACKING_URI")
    base = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def store_dir(uri: str) -> Path:
    """The folder of an embedded store's database (its artifacts live beside it)."""
    return Path(uri.removeprefix("sqlite:///")).resolve().parent


def ui_command(uri: str) -> str:
    """The exact command that browses this store (started in the store's folder, where
    its relative artifact location points; never with its password)."""
    if is_embedded(uri):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        return f"cd {shlex.quote(str(db.parent))} && {exe} ui --backend-store-uri sqlite:///{db.name} --workers 1 --port 5000"
    if tracking_store.is_postgres(uri):
        return tracking_store.ui_command(uri, shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow"))
    return f"open {redact_uri(uri)} in a browser"


def _ui_base(uri: str) -> str:
    """Where the UI of store ``uri`` is served: the server itself, else the address
    :func:`ui_command` serves on. Never with credentials: the browser asks for them."""
    if uri.startswith(("http://", "https://")):
        parts = urlparse(uri.rstrip("/"))
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return "http://127.0.0.1:5000"


def ui_url(uri: str, experiment_id: str, key: str = VIEW_KEY) -> str:
    """The page that opens the experiment in the UI's model-training view (MLflow 3 opens
    its GenAI view otherwise), on the shared view ``key``, its charts first."""
    return (
        f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"
        f"&viewStateShareKey={key}&compareRunsMode=CHART"
    )


def ui_run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's own page, in the UI's model-training view."""
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's HTTP client in a raydrat process: no retries of its own (its back-off sleeps for
minutes; raydrat's writer retries on its own thread, and a read on the training thread must
fail at once), and 10 s without an answer is a failure. Set for the whole process (MLflow
reads them from the environment at every request); a timeout the user set is kept."""


DB_ENGINE_TRIES = 1
"""MLflow's tries at opening a database store: its own are 10, with back-off sleeps that add
up to about 100 s before an unreachable PostgreSQL server is an error. raydrat's writer
retries on its own thread, and a read must fail at once (the server was checked when the
run started: :func:`raydrat.tracking_store.ready`)."""


@functools.cache
def client(uri: str) -> MlflowClient:
    """The one client of store ``uri`` in this process (made on first use)."""
    if tracking_store.is_postgres(uri):
        mlflow_db.MAX_RETRY_COUNT = DB_ENGINE_TRIES  # read by MLflow when it opens the store
    if not is_embedded(uri):
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    # the store's "Creating initial MLflow database tables..." lines are not the run's news
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # its warning on every pickled model: raydrat chooses pickle knowingly (Run.log_model)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


def set_experiment_tag(uri: str, experiment_id: str, key: str, value: str) -> None:
    """An experiment tag, its value redacted."""
    client(uri).set_experiment_tag(experiment_id, key, redact(value))


def get_or_create_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, tagged as model training and holding raydrat's view. A
    new experiment of the embedded store keeps its artifacts in ``mlartifacts/`` beside the
    database, recorded relative to it (MLflow's API only takes absolute locations, so the
    row is rewritten)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        exp_id = c.create_experiment(name)
        if is_embedded(uri):
            with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
                db.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                    (DEFAULT_ARTIFACTS, int(exp_id)),
                )
        exp = c.get_experiment(exp_id)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        set_experiment_tag(uri, exp.experiment_id, *EXPERIMENT_KIND)
    view = json.dumps(view_state())
    if exp.tags.get(VIEW_TAG + VIEW_KEY) != view:  # made by an older raydrat: today's names
        set_experiment_tag(uri, exp.experiment_id, VIEW_TAG + VIEW_KEY, view)
    return exp.experiment_id


def artifact_repo(uri: str, run_id: str):
    """The artifact repository of a run; a location relative to the embedded store is
    resolved against the database's folder (not the process's working directory: Ray
    workers and Tune trials run elsewhere)."""
    location = client(uri).get_run(run_id).info.artifact_uri
    if is_embedded(uri) and not urlparse(location).scheme and not os.path.isabs(location):
        location = str(store_dir(uri) / location)
    return get_artifact_repository(location, tracking_uri=uri)
