"""MLflow tracking: the embedded default store, and the :class:`Run` handle.

The default store is an SQLite file in the working directory (``sqlite:///mlruns.db``) with
artifacts in ``mlartifacts/`` beside it; any other URI (an ``mlflow server``) comes from
``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``. The driver creates the run and logs
params and artifacts; the training worker of rank 0 logs metrics into that run by id.

What a run shows: the experiment is tagged as model training (``mlflow.experimentKind``,
so the UI opens on runs and metrics); every run carries source, git commit and user tags
(:func:`run_tags`); params are only the config sections the run uses (:func:`run_params`)
while ``config.yaml`` holds every key; the data is a dataset input (:func:`data_inputs`).
In the embedded store the artifact location is ``mlartifacts`` *relative to the store*, so
a copied ``mlruns.db`` + ``mlartifacts/`` stays whole: raydrat resolves it against the
database's folder, and ``mlflow ui`` started in that folder (:func:`ui_command`) reads it
there.

Everything goes through a :class:`Run`: ``Run.start(...)`` creates one, ``Run.attach(uri,
run_id)`` reopens one (a worker, a resumed run), and ``Run.off()`` is the run of an
untracked job, whose every method does nothing, so callers never test whether tracking is
on. A ``Run`` pickles as its ``(uri, run_id)``, so it can be handed to Ray workers.
Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import json
import logging
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from raydrat.config.run import RaydratConfig
from raydrat.config.tracking import TrackingConfig
from raydrat.core import metrics as M
from raydrat.envvars import env_set
from raydrat.redact import redact, redact_uri, remember_uri

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag that opens the MLflow UI in its model-training view (runs, metric
charts) instead of the GenAI one (traces)."""
PARENT_TAG = "mlflow.parentRunId"
DATA_CONTEXT_TAG = "mlflow.data.context"


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: config, then ``$MLFLOW_TRACKING_URI``, then the embedded
    SQLite file (made absolute so Ray workers with another cwd write to the same store).
    A password in the URI is registered as a secret (:mod:`raydrat.redact`)."""
    if cfg.tracking_uri:
        remember_uri(cfg.tracking_uri)
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        remember_uri(env)
        return env
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
        return f"cd {shlex.quote(str(db.parent))} && {exe} ui --backend-store-uri sqlite:///{db.name} --port 5000"
    return f"open {redact_uri(uri)} in a browser"


def client(uri: str) -> MlflowClient:
    # the store's "Creating initial MLflow database tables..." lines are not the run's news
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # its warning on every pickled model: raydrat chooses pickle knowingly (see log_model)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY = "raydrat"
TABLE_METRICS = (M.VAL_LOSS, M.TRAIN_LOSS, M.PEAK_BYTES, M.ESTIMATED_BYTES, M.TOKENS_PER_S_AVG)


def _line_chart(key: str, section: str) -> dict:
    return {
        "uuid": f"raydrat-{key}",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "metricKey": key,
        "selectedMetricKeys": [key],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def view_state(search_filter: str | None = None) -> dict[str, Any]:
    """A view of the experiment's runs that leads with the loss, in the form the MLflow UI
    (3.x) shares views in (an experiment tag ``mlflow.sharedViewState.<key>``, opened with
    ``?viewStateShareKey=<key>``): the loss charts first in their own section (the rest
    follow in MLflow's own order), the table's columns val/train loss, measured and
    estimated peak, tokens/s and raydrat's status; with ``search_filter``, only those runs,
    ranked by val loss (which lists a sweep's trials rather than folding them under it)."""
    columns = [f"metrics.`{k}`" for k in TABLE_METRICS] + ["tags.`raydrat.status`", "attributes.`Source`"]
    state: dict[str, Any] = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "isAccordionReordered": True,
        "compareRunSections": [
            {
                "uuid": "raydrat-loss",
                "name": "Loss",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "compareRunCharts": [_line_chart(k, "raydrat-loss") for k in (M.VAL_LOSS, M.TRAIN_LOSS)],
    }
    if search_filter:
        state.update(searchFilter=search_filter, orderByKey=f"metrics.`{M.VAL_LOSS}`", orderByAsc=True)
    return state


def share_view(uri: str, experiment_id: str, key: str, search_filter: str | None = None) -> None:
    client(uri).set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(view_state(search_filter)))


def ui_url(uri: str, experiment_id: str, key: str = VIEW_KEY) -> str:
    """The page that opens the experiment in the UI's model-training view (MLflow 3 opens
    its GenAI view otherwise), on the shared view ``key``, its charts first. Never with
    credentials: the browser asks for them."""
    if uri.startswith(("http://", "https://")):
        parts = urlparse(uri.rstrip("/"))
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    else:
        base = "http://127.0.0.1:5000"
    return (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}&compareRunsMode=CHART"
    )


def get_or_create_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, tagged as model training. A new experiment of the
    embedded store keeps its artifacts in ``mlartifacts/`` beside the database, recorded
    relative to it (MLflow's API only takes absolute locations, so the row is rewritten)."""
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
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if VIEW_TAG + VIEW_KEY not in exp.tags:
        share_view(uri, exp.experiment_id, VIEW_KEY)
    return exp.experiment_id


def artifact_repo(uri: str, run_id: str):
    """The artifact repository of a run; a location relative to the embedded store is
    resolved against the database's folder (not the process's working directory: Ray
    workers and Tune trials run elsewhere)."""
    location = client(uri).get_run(run_id).info.artifact_uri
    if is_embedded(uri) and not urlparse(location).scheme and not os.path.isabs(location):
        location = str(store_dir(uri) / location)
    return get_artifact_repository(location, tracking_uri=uri)


# ----------------------------------------------------------------------------- what a run shows


@functools.lru_cache(maxsize=1)
def _git_commit() -> tuple[str, bool] | None:
    """The commit of the checkout raydrat runs from, and whether it has local changes
    (``None`` outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(dirty)) if commit else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


COMMAND_TAG = "raydrat.command"


def run_tags() -> dict[str, str]:
    """Source, git commit and user tags, as MLflow's own fluent API would set them: the
    entry point that started this process (``raydrat train debug``: the UI shows a source's
    last path part, so paths are shortened to their names; the whole command line is
    ``raydrat.command``), the commit raydrat runs from, the user."""
    argv = list(sys.argv) or ["python"]
    prog = "raydrat" if argv[0].endswith(("raydrat", "raydrat/cli.py")) else Path(argv[0]).name
    words = [Path(a).stem if "/" in a or a.endswith(".yaml") else a for a in argv[1:] if not a.startswith("-")][:2]
    # under `ray job submit` the driver has Ray's job config in its environment
    tags = {
        "mlflow.source.name": " ".join([prog, *words]),
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL",
        "mlflow.user": _user(),
        COMMAND_TAG: shlex.join([prog, *argv[1:]])[:5000],
    }
    git = _git_commit()
    if git:
        tags["mlflow.source.git.commit"] = git[0]
        tags["mlflow.source.git.dirty"] = str(git[1]).lower()
    return tags


def run_params(cfg: RaydratConfig, runtime: Any = None) -> dict[str, Any]:
    """The params of a run: the config sections the run uses (``sync`` only with several
    workers, ``slots`` settings only when slots are on, ``recompute.gates`` only when gated,
    no ``tracking``; the rest is in ``config.yaml``) and, given a
    :class:`~raydrat.core.runtime.Runtime`, what it resolved to (``runtime.*``)."""
    flat = cfg.flat()
    drop = ["tracking."]
    if cfg.scaling.max_workers == 1:
        drop.append("sync.")
    if cfg.slots.mode == "all":
        drop += [k for k in flat if k.startswith("slots.") and k != "slots.mode"]
    if cfg.recompute.mode != "gated":
        drop.append("recompute.gates.")
    if cfg.recompute.budget_mb is None:
        drop.append("recompute.budget_mb")
    if cfg.train.precision_fallback == "none":
        drop += ["train.precision_fallback_after", "train.precision_fallback_steps"]
    if not cfg.train.auto_microbatch:
        drop.append("train.min_micro_batch")
    if cfg.data.prepared is None:
        drop += ["data.prepared", "data.prepared_endpoint_url"]
    params = {k: v for k, v in flat.items() if not any(k == d or (d.endswith(".") and k.startswith(d)) for d in drop)}
    if runtime is not None:
        params.update(
            {
                "runtime.device": runtime.device_type,
                "runtime.precision": runtime.precision,
                "runtime.attention_backend": runtime.attention_backend,
            }
        )
    return params


def data_inputs(lineage: Mapping[str, Any], profile: Mapping[str, Any]) -> list[DatasetInput]:
    """The run's data as MLflow dataset inputs, one per split (context ``training`` and
    ``validation``): named after the sources (or the prepared directory), with a digest of
    the lineage (files and sizes, tokenizer hash, split rule, sequence length), the source
    URIs, the block schema and ``profile`` (the data counts)."""
    if lineage.get("kind") == "prepared":
        uris = [str(lineage["prepared"])]
    else:
        uris = [str(s.get("path")) for s in lineage.get("sources", [])]
    name = ",".join(Path(u.rstrip("/")).name or u for u in uris)[:200] or "data"
    digest = hashlib.sha256(json.dumps(lineage, sort_keys=True, default=str).encode()).hexdigest()
    source_type = "s3" if any(u.startswith("s3://") for u in uris) else "local"
    schema = json.dumps(
        {
            "mlflow_colspec": [
                {"name": "tokens", "type": "array", "items": {"type": "integer"}, "required": True},
                {"name": "block_id", "type": "long", "required": True},
            ]
        }
    )
    counts = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in profile.items()}
    out = []
    for split, context in (("train", "training"), ("val", "validation")):
        ds = Dataset(
            name=f"{name}:{split}",
            digest=hashlib.sha256((digest + split).encode()).hexdigest()[:16],
            source_type=source_type,
            source=json.dumps({"uris": uris, "split": split}),
            schema=schema,
            profile=json.dumps(counts, default=str),
        )
        out.append(DatasetInput(ds, [InputTag(DATA_CONTEXT_TAG, context)]))
    return out


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    start_time_s: float | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` if given; started at ``start_time_s``,
    else now) and log its params."""
    c = client(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    all_tags = {**run_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    start_ms = int(start_time_s * 1000) if start_time_s is not None else None
    run = c.create_run(exp_id, start_time=start_ms, run_name=run_name, tags=all_tags)
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
    repo = artifact_repo(uri, run_id)
    if Path(path).is_dir():
        repo.log_artifacts(str(path), "/".join(p for p in (artifact_path, Path(path).name) if p))
    else:
        repo.log_artifact(str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(redact(text), encoding="utf-8")
        artifact_repo(uri, run_id).log_artifact(str(Path(tmp) / name), folder or None)


@contextlib.contextmanager
def _no_printed_urls():
    """MLflow prints a run's URL (a server's password included) when a run ends; not here."""
    with env_set("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        yield


def end_run(uri: str, run_id: str, status: str = "FINISHED", end_time_s: float | None = None) -> None:
    end_ms = int(end_time_s * 1000) if end_time_s is not None else None
    with _no_printed_urls():
        client(uri).set_terminated(run_id, status=status, end_time=end_ms)


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then restored, the
    environment too: ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI`` (for
    subprocesses), and a later child of this process must not inherit a URI raydrat set."""
    saved_uri = mlflow.get_tracking_uri()
    with env_set("MLFLOW_TRACKING_URI", None):
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)


@contextlib.contextmanager
def _fluent_run(uri: str, run_id: str):
    """MLflow's fluent API on run ``run_id`` of ``uri`` (what ``mlflow.<flavour>.log_model``
    needs), with the process's tracking URI and, for the embedded store, its working
    directory (where MLflow resolves the relative artifact location) set for the call and
    restored after. The run's status is left as it was."""
    saved_cwd = os.getcwd()
    status = client(uri).get_run(run_id).info.status
    with _fluent_uri(uri):
        if is_embedded(uri):
            os.chdir(store_dir(uri))
        try:
            with _no_printed_urls(), mlflow.start_run(run_id=run_id):
                yield
        finally:
            os.chdir(saved_cwd)
            client(uri).update_run(run_id, status=status)


def log_model(
    uri: str,
    run_id: str,
    model: Any,
    name: str,
    registered_model_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    step: int = 0,
) -> str:
    """Log a torch ``model`` to the run as an MLflow model named ``name`` (the UI's models
    view; ``mlflow.pytorch.load_model`` loads it back), registered as
    ``registered_model_name`` when given. Returns its ``models:/`` URI."""
    with _fluent_run(uri, run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            registered_model_name=registered_model_name,
            metadata=dict(metadata or {}),
            step=step,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle",  # the module itself (pt2 would trace forward on an example)
        )
    return info.model_uri


def register_model(uri: str, model_uri: str, name: str) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns the version."""
    with _fluent_uri(uri):
        return mlflow.register_model(model_uri, name).version


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


class Run:
    """One MLflow run, or none (``Run.off()``: every method is a no-op)."""

    def __init__(self, uri: str | None = None, run_id: str | None = None):
        self.uri, self.run_id = (uri, run_id) if uri and run_id else (None, None)

    @classmethod
    def off(cls) -> Run:
        return cls()

    @classmethod
    def attach(cls, uri: str | None, run_id: str | None) -> Run:
        return cls(uri, run_id)

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent: Run | None = None,
        start_time_s: float | None = None,
    ) -> Run:
        parent_id = parent.run_id if parent is not None else None
        return cls(uri, start_run(uri, experiment, run_name, params, tags, parent_id, start_time_s))

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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self and tags:
            client(self.uri).log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_inputs(self, inputs: list[DatasetInput]) -> None:
        if self and inputs:
            client(self.uri).log_inputs(self.run_id, datasets=inputs)

    def set_status(self, status: str) -> None:
        """A new status without an end time: ``RUNNING`` again (a resumed run), or the
        status of a run that never ran (it keeps no duration)."""
        if self:
            client(self.uri).update_run(self.run_id, status=status)

    def end(self, status: str = "FINISHED", end_time_s: float | None = None) -> None:
        if self:
            end_run(self.uri, self.run_id, status, end_time_s)

    def status(self) -> str | None:
        return client(self.uri).get_run(self.run_id).info.status if self else None

    def log_model(
        self,
        model: Any,
        name: str,
        registered_model_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> str | None:
        if self:
            return log_model(self.uri, self.run_id, model, name, registered_model_name, metadata, step)
        return None

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return metric_history(self.uri, self.run_id, key) if self else []

    def experiment_id(self) -> str | None:
        return client(self.uri).get_run(self.run_id).info.experiment_id if self else None
