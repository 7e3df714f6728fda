"""The :class:`Run` handle: the one way raydrat writes to MLflow, and reads a run back.

``Run.start(...)`` creates a run, ``Run.attach(uri, run_id)`` reopens one (a worker, a
resumed run, a trial's run found by its tags), and ``Run.off()`` is the run of an untracked
job, whose every method does nothing, so callers never test whether tracking is on. A
``Run`` pickles as its ``(uri, run_id)``, so it can be handed to Ray workers.

Every write of a run goes through a few methods here:

* :meth:`Run._log_batch`: metrics, params and tags (MLflow's ``log_batch``, in chunks within
  its limits);
* :meth:`Run._upload`: artifact files (and text, written to a file first);
* :meth:`Run._set_status`: the status, and the end time when the run ends;
* and, once per run at most, :meth:`Run.log_inputs`, :meth:`Run.log_model`,
  :meth:`Run.register_model` and :meth:`Run.share_view`.

Every text written is redacted (:mod:`raydrat.redact`) on its way there: tag and param
values, the run's name, artifact files that hold a secret (uploaded as a redacted copy),
dataset descriptions, model metadata. The store is reached through one client per store
(:func:`raydrat.tracking.store.client`); nothing else in raydrat calls MLflow's client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag
from mlflow.entities import Run as MlflowRun

from raydrat.envvars import env_set
from raydrat.redact import redact, redact_obj
from raydrat.tracking.content import run_tags
from raydrat.tracking.store import (
    artifact_repo,
    client,
    get_or_create_experiment,
    is_embedded,
    set_experiment_tag,
    store_dir,
)
from raydrat.tracking.views import VIEW_TAG, view_state

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
"""The most of each that one ``log_batch`` request takes."""


def _text(value: Any, limit: int) -> str:
    """A tag or param value as MLflow stores it: text, redacted, cut to ``limit``."""
    return redact("None" if value is None else str(value))[:limit]


def _holds_secret(path: Path) -> bool:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):  # not text: nothing of raydrat's writing
        return False
    return redact(text) != text


@contextlib.contextmanager
def _redacted(path: Path) -> Iterator[Path]:
    """``path`` (a file or a folder) as it may be uploaded: itself when no file in it holds
    a secret, else a copy whose text files are redacted."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    holding = [f for f in files if _holds_secret(f)]
    if not holding:
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        if path.is_file():
            shutil.copyfile(path, copy)
        else:
            shutil.copytree(path, copy)
        for f in holding:
            target = copy if path.is_file() else copy / f.relative_to(path)
            target.write_text(redact(f.read_text(encoding="utf-8")), encoding="utf-8")
        yield copy


def _redacted_input(item: DatasetInput) -> DatasetInput:
    d = item.dataset
    dataset = Dataset(
        name=redact(d.name),
        digest=d.digest,
        source_type=d.source_type,
        source=redact(d.source),
        schema=d.schema,
        profile=redact(d.profile) if d.profile else d.profile,
    )
    return DatasetInput(dataset, item.tags)


@contextlib.contextmanager
def _no_printed_urls():
    """MLflow prints a run's URL (a server's password included) when a run ends; not here."""
    with env_set("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        yield


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


class Run:
    """One MLflow run, or none (``Run.off()``: every method is a no-op, reads return
    nothing)."""

    def __init__(self, uri: str | None = None, run_id: str | None = None):
        self.uri, self.run_id = (uri, run_id) if uri and run_id else (None, None)
        self._experiment_id: str | None = None
        self._repo = None

    # ------------------------------------------------------------------ opening

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
        """Create a run in ``experiment`` (made when missing), nested under ``parent`` if
        given, started at ``start_time_s`` (else now), with the tags every run carries
        (:func:`~raydrat.tracking.content.run_tags`) and ``tags``; then log ``params``."""
        exp_id = get_or_create_experiment(uri, experiment)
        all_tags = {**run_tags(), **(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent.run_id
        created = client(uri).create_run(
            exp_id,
            start_time=int(start_time_s * 1000) if start_time_s is not None else None,
            run_name=redact(run_name),
            tags={k: _text(v, MAX_TAG_LEN) for k, v in all_tags.items()},
        )
        run = cls(uri, created.info.run_id)
        run._experiment_id = exp_id
        if params:
            run.log_params(params)
        return run

    def __bool__(self) -> bool:
        return self.run_id is not None

    def __reduce__(self):
        return (Run, (self.uri, self.run_id))

    def __repr__(self) -> str:
        return f"Run({self.run_id})" if self else "Run.off()"

    # ------------------------------------------------------------------ writing

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None])

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_batch(params=[Param(k, _text(v, MAX_PARAM_LEN)) for k, v in sorted(params.items())])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch(tags=[RunTag(k, _text(v, MAX_TAG_LEN)) for k, v in tags.items()])

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` (a path inside the run's artifacts)."""
        if not self:
            return
        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_text(text, encoding="utf-8")
            self._upload(Path(tmp) / name, folder or None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder (kept under its own name), under ``artifact_path``."""
        if self:
            self._upload(Path(path), artifact_path)

    def log_inputs(self, inputs: Sequence[DatasetInput]) -> None:
        if self and inputs:
            client(self.uri).log_inputs(self.run_id, datasets=[_redacted_input(i) for i in inputs])

    def share_view(self, key: str, search_filter: str | None = None) -> None:
        """A view of this run's experiment in the UI under ``key``
        (:func:`~raydrat.tracking.views.view_state`), showing only the runs ``search_filter``
        selects."""
        if self:
            set_experiment_tag(self.uri, self.experiment_id(), VIEW_TAG + key, json.dumps(view_state(search_filter)))

    def set_status(self, status: str) -> None:
        """A new status without an end time: ``RUNNING`` again (a resumed run), or the
        status of a run that never ran (it keeps no duration)."""
        self._set_status(status)

    def end(self, status: str = "FINISHED", end_time_s: float | None = None) -> None:
        self._set_status(status, ended=True, end_time_s=end_time_s)

    def log_model(
        self,
        model: Any,
        name: str,
        registered_model_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> str | None:
        """Log a torch ``model`` to the run as an MLflow model named ``name`` (the UI's
        models view; ``mlflow.pytorch.load_model`` loads it back), registered as
        ``registered_model_name`` when given. Returns its ``models:/`` URI."""
        if not self:
            return None
        with self._fluent():
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                registered_model_name=registered_model_name,
                metadata=redact_obj(dict(metadata or {})),
                step=step,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                serialization_format="pickle",  # the module itself (pt2 would trace forward on an example)
            )
        return info.model_uri

    def register_model(self, model_uri: str, name: str) -> str | None:
        """Register ``model_uri`` (one of this run's models) as a new version of ``name``;
        returns the version."""
        if not self:
            return None
        with _fluent_uri(self.uri):
            return mlflow.register_model(model_uri, name).version

    # ------------------------------------------------------------------ reading

    def fetch(self) -> MlflowRun | None:
        """The run as the store holds it now (MLflow's ``Run``: info, data, inputs)."""
        return client(self.uri).get_run(self.run_id) if self else None

    def status(self) -> str | None:
        """The run's status in the store (one read: call it where it matters)."""
        return self.fetch().info.status if self else None

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client(self.uri).get_metric_history(self.run_id, key)] if self else []

    def experiment_id(self) -> str | None:
        if self and self._experiment_id is None:
            self._experiment_id = self.fetch().info.experiment_id
        return self._experiment_id

    def children(self, filter_string: str | None = None) -> list[Run]:
        """The runs nested under this one (and matching ``filter_string``, MLflow's search
        syntax), newest first."""
        if not self:
            return []
        found = client(self.uri).search_runs(
            [self.experiment_id()],
            filter_string=" and ".join(
                [f"tags.`{PARENT_TAG}` = '{self.run_id}'", *([filter_string] if filter_string else [])]
            ),
            order_by=["attributes.start_time DESC"],
        )
        return [Run(self.uri, r.info.run_id) for r in found]

    def logged_models(self) -> dict[str, str]:
        """The models logged to this run: name -> ``models:/`` URI."""
        if not self:
            return {}
        logged = client(self.uri).search_logged_models(
            [self.experiment_id()], filter_string=f"source_run_id = '{self.run_id}'"
        )
        return {m.name: m.model_uri for m in logged}

    # ------------------------------------------------------------------ the writes themselves

    def _log_batch(
        self, metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()
    ) -> None:
        """Metrics, params and tags (already redacted), in as few requests as MLflow's
        limits allow."""
        if not self:
            return
        pending = {"metrics": list(metrics), "params": list(params), "tags": list(tags)}
        while any(pending.values()):
            chunk = {k: v[: BATCH_LIMITS[k]] for k, v in pending.items()}
            pending = {k: v[BATCH_LIMITS[k] :] for k, v in pending.items()}
            client(self.uri).log_batch(self.run_id, **chunk)

    def _upload(self, path: Path, artifact_path: str | None) -> None:
        """A file or folder into the run's artifacts, redacted where it holds a secret."""
        if self._repo is None:
            self._repo = artifact_repo(self.uri, self.run_id)
        with _redacted(path) as local:
            if local.is_dir():
                self._repo.log_artifacts(str(local), "/".join(p for p in (artifact_path, path.name) if p))
            else:
                self._repo.log_artifact(str(local), artifact_path)

    def _set_status(self, status: str, ended: bool = False, end_time_s: float | None = None) -> None:
        if not self:
            return
        if ended:
            end_ms = int(end_time_s * 1000) if end_time_s is not None else None
            with _no_printed_urls():
                client(self.uri).set_terminated(self.run_id, status=status, end_time=end_ms)
        else:
            client(self.uri).update_run(self.run_id, status=status)

    @contextlib.contextmanager
    def _fluent(self):
        """MLflow's fluent API on this run (what ``mlflow.<flavour>.log_model`` needs), with
        the process's tracking URI and, for the embedded store, its working directory (where
        MLflow resolves the relative artifact location) set for the call and restored after.
        The run's status is left as it was."""
        saved_cwd = os.getcwd()
        status = self.status()
        with _fluent_uri(self.uri):
            if is_embedded(self.uri):
                os.chdir(store_dir(self.uri))
            try:
                with _no_printed_urls(), mlflow.start_run(run_id=self.run_id):
                    yield
            finally:
                os.chdir(saved_cwd)
                self._set_status(status)
