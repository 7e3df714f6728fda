"""The writes themselves: every record a :class:`~raydrat.tracking.run.Run` hands to its
writer, as MLflow calls, and the delivery of a backlog that a process left behind.

A record is a plain dict (JSON, so a backlog can hold it):

* ``{"op": "batch", "metrics": [[key, value, timestamp_ms, step], ...], "params": [[k, v]],
  "tags": [[k, v]]}``: MLflow's ``log_batch``, in chunks within its limits;
* ``{"op": "upload", "file": PATH, "artifact_path": ...}``: a staged (already redacted) copy
  of a file or folder, relative to the backlog folder;
* ``{"op": "inputs", "datasets": [...]}``: dataset inputs (a dataset another writer
  creates at the same moment is linked, not refused: :func:`created_meanwhile`);
* ``{"op": "status", "status": ..., "ended": bool, "end_ms": ...}``: the run's status (its
  end time is the time the run ended, not the time the record is delivered);
* ``{"op": "model", "file": PATH, "name": ..., ...}``: a model logged while the store was
  unreachable (the module pickled beside).

Delivered twice, most records change nothing (params, tags, status and artifacts are
keyed; MLflow's SQL stores also drop an identical metric row). Metrics are rows that any
other store would keep twice, so a record that may already have been sent (``maybe_sent``:
the one in flight when the store went away, or the first pending record of a journal left
by a process that is gone) has its metric rows checked against the store's history first,
and a model against the run's logged models.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

import raydrat.tracking.journal as J
from raydrat.config import ConfigError
from raydrat.core import metrics as M
from raydrat.envvars import env_set
from raydrat.redact import redact, redact_obj, redact_uri
from raydrat.tracking.store import artifact_repo, client, is_embedded, store_dir

BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
"""The most of each that one ``log_batch`` request takes."""


class TrackingUnavailable(ConfigError):
    """The store cannot be reached (the run itself goes on; what it writes waits)."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the store is unreachable or overloaded for now (try again
    later), rather than that it refused the record (a 4xx answer: trying again would not
    help)."""
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code >= 500 or code in (408, 429)
    return isinstance(exc, OSError) or type(exc).__name__ in ("OperationalError", "TimeoutError")


_REASONS = (
    re.compile(r"\[Errno -?\d+\] ([^\"')\]]+)"),  # Connection refused, Name or service not known
    re.compile(r"(Connection (?:broken|aborted|reset)[^(\"']*)"),
    re.compile(r"((?:Read|Connect) timed out)"),
    re.compile(r"((?:database|table) is locked)"),
)


def reason(exc: BaseException) -> str:
    """A few words on why the store could not be reached (``Connection refused``)."""
    text = redact(str(exc))
    for pattern in _REASONS:
        found = pattern.findall(text)
        if found:
            return found[-1].strip().rstrip(":,.")
    return (text.strip().splitlines() or [type(exc).__name__])[0][:120]


def unavailable(uri: str, exc: BaseException, fix: str = "") -> TrackingUnavailable:
    return TrackingUnavailable(f"MLflow at {redact_uri(uri)} unreachable ({reason(exc)}){fix}")


# ----------------------------------------------------------------------------- records


def batch_record(
    metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()
) -> dict[str, Any]:
    return {
        "op": "batch",
        "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
        "params": [[p.key, p.value] for p in params],
        "tags": [[t.key, t.value] for t in tags],
    }


def inputs_record(inputs: Sequence[DatasetInput]) -> dict[str, Any]:
    """Dataset inputs, their texts redacted."""
    out = []
    for item in inputs:
        d = item.dataset
        out.append(
            {
                "name": redact(d.name),
                "digest": d.digest,
                "source_type": d.source_type,
                "source": redact(d.source),
                "schema": d.schema,
                "profile": redact(d.profile) if d.profile else d.profile,
                "tags": [[t.key, t.value] for t in item.tags],
            }
        )
    return {"op": "inputs", "datasets": out}


def status_record(status: str, ended: bool, end_ms: int | None) -> dict[str, Any]:
    return {"op": "status", "status": status, "ended": ended, "end_ms": end_ms}


def is_end(record: dict[str, Any]) -> bool:
    return record["op"] == "status" and record["ended"]


def metrics_only(record: dict[str, Any]) -> bool:
    """A batch of metrics alone (training's records): consecutive ones are sent as one."""
    return record["op"] == "batch" and not record["params"] and not record["tags"]


def group_of(peek: Callable[[], dict | None], take: Callable[[], dict]) -> list[dict[str, Any]]:
    """The next records to send together, taken from a queue read with ``peek`` and
    ``take``: one record, or consecutive :func:`metrics_only` ones up to MLflow's limit of
    metrics per request (a backlog goes at the pace of requests, not of training's steps)."""
    group: list[dict[str, Any]] = []
    metrics = 0
    while (record := peek()) is not None:
        fits = metrics_only(record) and metrics + len(record["metrics"]) <= BATCH_LIMITS["metrics"]
        if group and not (fits and metrics_only(group[0])):
            break
        group.append(take())
        metrics += len(record["metrics"]) if record["op"] == "batch" else 0
        if not metrics_only(record):
            break
    return group


def merged(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for ``records`` (one, or consecutive :func:`metrics_only` ones), sent in as
    few requests as MLflow's limits allow; it may have been sent if any of them may."""
    if len(records) == 1:
        return records[0]
    return {
        "op": "batch",
        "metrics": [m for r in records for m in r["metrics"]],
        "params": [],
        "tags": [],
        "tried": any(r.get("tried") for r in records),
    }


# ----------------------------------------------------------------------------- sending


def send(uri: str, run_id: str, folder: Path, record: dict[str, Any], maybe_sent: bool = False) -> None:
    """Write ``record`` into run ``run_id`` of store ``uri`` (files it names are under
    ``folder``). Raises what MLflow raises."""
    op, c = record["op"], client(uri)
    if op == "batch":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        if maybe_sent and metrics:
            metrics = _not_in_store(uri, run_id, metrics)
        pending = {
            "metrics": metrics,
            "params": [Param(k, v) for k, v in record["params"]],
            "tags": [RunTag(k, v) for k, v in record["tags"]],
        }
        while any(pending.values()):
            chunk = {k: v[: BATCH_LIMITS[k]] for k, v in pending.items()}
            pending = {k: v[BATCH_LIMITS[k] :] for k, v in pending.items()}
            c.log_batch(run_id, **chunk)
    elif op == "upload":
        local = folder / record["file"]
        repo = _artifact_repo(uri, run_id)
        if local.is_dir():
            repo.log_artifacts(str(local), "/".join(p for p in (record["artifact_path"], local.name) if p))
        else:
            repo.log_artifact(str(local), record["artifact_path"])
    elif op == "inputs":
        datasets = [
            DatasetInput(
                Dataset(d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"]),
                [InputTag(k, v) for k, v in d["tags"]],
            )
            for d in record["datasets"]
        ]
        try:
            c.log_inputs(run_id, datasets=datasets)
        except MlflowException as exc:
            if not created_meanwhile(exc):
                raise
            c.log_inputs(run_id, datasets=datasets)  # the dataset exists now: this links it to the run
    elif op == "status":
        if record["ended"]:
            with no_printed_urls():
                c.set_terminated(run_id, status=record["status"], end_time=record["end_ms"])
        else:
            c.update_run(run_id, status=record["status"])
    elif op == "model":
        if maybe_sent and record["name"] in logged_models(uri, run_id):
            return
        model = torch.load(folder / record["file"], weights_only=False)
        log_model(
            uri, run_id, model, record["name"], record["registered_model_name"], record["metadata"], record["step"]
        )
    else:
        raise ValueError(f"unknown tracking record {op!r}")


_UNIQUE_VIOLATION = re.compile(
    r"duplicate key value violates unique constraint|UNIQUE constraint failed|Duplicate entry|IntegrityError"
)
"""What PostgreSQL, SQLite and MySQL (through SQLAlchemy, or a tracking server's answer)
say when a row another writer inserted meanwhile has the same key."""


def created_meanwhile(exc: MlflowException) -> bool:
    """Whether the store refused a dataset because another writer created the same one at
    the same moment (two trials of a sweep logging their common corpus: each looks for the
    dataset, finds none, and inserts it). Tried again, the write finds it and links it."""
    return bool(_UNIQUE_VIOLATION.search(str(exc)))


def _metric_row(key: str, value: float, timestamp: int, step: int) -> tuple:
    return (key, "nan" if math.isnan(value) else value, timestamp, step)


def _not_in_store(uri: str, run_id: str, metrics: list[Metric]) -> list[Metric]:
    """The rows of ``metrics`` the store does not hold yet (one history read per key)."""
    held = set()
    for key in {m.key for m in metrics}:
        held.update(_metric_row(key, m.value, m.timestamp, m.step) for m in client(uri).get_metric_history(run_id, key))
    return [m for m in metrics if _metric_row(m.key, m.value, m.timestamp, m.step) not in held]


@functools.lru_cache(maxsize=64)
def _artifact_repo(uri: str, run_id: str):
    return artifact_repo(uri, run_id)


def logged_models(uri: str, run_id: str) -> dict[str, str]:
    """The models logged to run ``run_id``: name -> ``models:/`` URI."""
    c = client(uri)
    experiment_id = c.get_run(run_id).info.experiment_id
    found = c.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return {m.name: m.model_uri for m in found}


@contextlib.contextmanager
def no_printed_urls():
    """MLflow prints a run's URL (a server's password included) when a run ends; not here."""
    with env_set("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        yield


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
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
def _fluent_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API on run ``run_id`` (what ``mlflow.<flavour>.log_model`` needs),
    with the process's tracking URI and, for the embedded store, its working directory
    (where MLflow resolves the relative artifact location) set for the call and restored
    after. The run's status is left as it was."""
    saved_cwd = os.getcwd()
    status = client(uri).get_run(run_id).info.status
    with fluent_uri(uri):
        if is_embedded(uri):
            os.chdir(store_dir(uri))
        try:
            with no_printed_urls(), mlflow.start_run(run_id=run_id):
                yield
        finally:
            os.chdir(saved_cwd)
            client(uri).update_run(run_id, status=status)


def log_model(
    uri: str,
    run_id: str,
    model: Any,
    name: str,
    registered_model_name: str | None,
    metadata: dict[str, Any],
    step: int,
) -> str:
    """Log a torch ``model`` to the run as an MLflow model (``mlflow.pytorch``); its
    ``models:/`` URI."""
    with _fluent_run(uri, run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            registered_model_name=registered_model_name,
            metadata=redact_obj(metadata),
            step=step,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle",  # the module itself (pt2 would trace forward on an example)
        )
    return info.model_uri


# ----------------------------------------------------------------------------- left behind


def deliver_left(uri: str, run_id: str, folder: Path) -> int:
    """Deliver the journals in ``folder`` whose processes are gone, in order, each record
    once; the records that end the run last (after every journal's other records). Returns
    how many records were delivered. Raises :class:`TrackingUnavailable` when the store
    cannot be reached (what is not delivered stays, acknowledged records are not sent
    again)."""
    adopted = [j for j in (J.Journal.adopt(p) for p in J.journals(folder)) if j is not None]
    delivered, ends, complete = 0, [], []
    try:
        for journal in adopted:
            first = True
            while group := group_of(journal.peek, journal.next_pending):
                if is_end(group[0]):
                    ends.append((journal, group))
                    continue
                _deliver(uri, run_id, folder, journal, group, maybe_sent=first)
                first = False
                delivered += len(group)
        for journal, group in sorted(ends, key=lambda jg: jg[1][0]["end_ms"] or 0):
            _deliver(uri, run_id, folder, journal, group, maybe_sent=True)
            delivered += 1
        complete = adopted
    except Exception as exc:
        if transient(exc):
            raise unavailable(uri, exc) from exc
        raise
    finally:
        for journal in adopted:
            journal.close(remove=journal in complete)
    return delivered


def _deliver(uri: str, run_id: str, folder: Path, journal: J.Journal, group: list[dict], maybe_sent: bool) -> None:
    """Send ``group`` (as one record), then acknowledge each of its records."""
    record = merged(group)
    try:
        send(uri, run_id, folder, record, maybe_sent=maybe_sent or record.get("tried", False))
    except Exception as exc:
        if transient(exc):
            raise
        refused(run_id, record, exc)
    for r in group:
        journal.ack(r["seq"])
        J.unstage(folder, r)


def refused(run_id: str, record: dict[str, Any], exc: BaseException) -> None:
    """Say that the store refused ``record`` (it is dropped: sending it again would not help)."""
    M.setup_logging().warning(f"MLflow refused a {record['op']} record of run {run_id}, dropped: {reason(exc)}")
