"""The :class:`Run` handle: the one way raydrat writes to MLflow, and reads a run back.

``Run.start(...)`` creates a run, ``Run.attach(uri, run_id)`` reopens one (a worker, a
resumed run, a trial's run found by its tags), and ``Run.off()`` is the run of an untracked
job, whose every method does nothing, so callers never test whether tracking is on. A
``Run`` pickles as its ``(uri, run_id, backlog)``, so it can be handed to Ray workers.

Every write of a run goes through a few methods here, and none waits on the store: each
hands a record to the run's writer in this process (:mod:`raydrat.tracking.writer`), which
delivers them in order from its own thread and keeps them in the run's backlog folder
(``backlog``: the run directory's, else one per run under ``~/.cache``) while the store
cannot be reached:

* :meth:`Run._log_batch`: metrics, params and tags;
* :meth:`Run._upload`: artifact files (and text, written to a file first), staged as copies;
* :meth:`Run._set_status`: the status, and the end time when the run ends;
* :meth:`Run.log_inputs`; :meth:`Run.log_model` (at once when the store answers, else kept
  in the backlog too); and, at once, :meth:`Run.register_model` and :meth:`Run.share_view`.

:meth:`Run.end` sets the final status with a short timeout and never raises: when the
store is down, the status and the records still pending stay in the backlog, and the next
command that touches the run delivers them (:meth:`Run.settle`). The process that drives a
run holds it (:meth:`Run.claim`); a run whose driver died is ended as ``KILLED`` by the next
:meth:`Run.settle`.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.entities import Run as MlflowRun

import raydrat.tracking.delivery as D
import raydrat.tracking.journal as J
from raydrat.core import metrics as M
from raydrat.redact import redact, redact_obj, redact_uri, remember_uri
from raydrat.tracking.content import run_tags
from raydrat.tracking.delivery import TrackingUnavailable
from raydrat.tracking.store import client, get_or_create_experiment, set_experiment_tag
from raydrat.tracking.views import VIEW_TAG, view_state
from raydrat.tracking.writer import Deliveries, Writer, writer

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
END_TIMEOUT_S = 10.0
"""How long a run's end waits for its records and final status to reach the store."""
READ_FLUSH_S = 10.0
"""How long a read waits for this process's records to arrive first (read your writes)."""
T = TypeVar("T")


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


_claims: dict[tuple[str, str], int] = {}
"""The runs this process drives: their driver lock's file descriptor."""


class Run:
    """One MLflow run, or none (``Run.off()``: every method is a no-op, reads return
    nothing). ``backlog``: the folder that keeps what the store cannot take yet (default:
    one per run under ``~/.cache/raydrat/tracking``)."""

    def __init__(self, uri: str | None = None, run_id: str | None = None, backlog: str | Path | None = None):
        self.uri, self.run_id = (uri, run_id) if uri and run_id else (None, None)
        remember_uri(self.uri)  # its password is masked in everything written from here
        self._backlog = Path(backlog) if backlog and self.run_id else None
        self._experiment_id: str | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def off(cls) -> Run:
        return cls()

    @classmethod
    def attach(cls, uri: str | None, run_id: str | None, backlog: str | Path | None = None) -> Run:
        return cls(uri, run_id, backlog)

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
        backlog: str | Path | None = None,
    ) -> Run:
        """Create a run in ``experiment`` (made when missing), nested under ``parent`` if
        given, started at ``start_time_s`` (else now), with the tags every run carries
        (:func:`~raydrat.tracking.content.run_tags`) and ``tags``; then log ``params``.
        Raises :class:`TrackingUnavailable` when the store cannot be reached (there is no
        run to keep records for)."""
        all_tags = {**run_tags(), **(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent.run_id
        try:
            exp_id = get_or_create_experiment(uri, experiment)
            created = client(uri).create_run(
                exp_id,
                start_time=int(start_time_s * 1000) if start_time_s is not None else None,
                run_name=redact(run_name),
                tags={k: _text(v, MAX_TAG_LEN) for k, v in all_tags.items()},
            )
        except Exception as exc:
            if D.transient(exc):
                raise D.unavailable(
                    uri,
                    exc,
                    ": start it, point tracking.tracking_uri at one that runs, or set tracking.enabled=false",
                ) from None
            raise
        run = cls(uri, created.info.run_id, backlog)
        run._experiment_id = exp_id
        if params:
            run.log_params(params)
        return run

    def __bool__(self) -> bool:
        return self.run_id is not None

    def __reduce__(self):
        return (Run, (self.uri, self.run_id, str(self._backlog) if self._backlog else None))

    def __repr__(self) -> str:
        return f"Run({self.run_id})" if self else "Run.off()"

    @property
    def backlog(self) -> Path | None:
        """The folder that keeps this run's records while the store cannot take them."""
        if not self:
            return None
        return self._backlog or J.default_folder(self.run_id)

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
            self._writer().put(D.inputs_record(inputs))

    def share_view(self, key: str, search_filter: str | None = None) -> None:
        """A view of this run's experiment in the UI under ``key``
        (:func:`~raydrat.tracking.views.view_state`), showing only the runs ``search_filter``
        selects."""
        if self:
            self._now(
                lambda: set_experiment_tag(
                    self.uri, self.experiment_id(), VIEW_TAG + key, json.dumps(view_state(search_filter))
                )
            )

    def set_status(self, status: str) -> None:
        """A new status without an end time: ``RUNNING`` again (a resumed run), or the
        status of a run that never ran (it keeps no duration)."""
        self._set_status(status)

    def end(self, status: str = "FINISHED", end_time_s: float | None = None) -> int:
        """End the run as ``status`` at ``end_time_s`` (else now), waiting at most
        :data:`END_TIMEOUT_S` for the store; never raises (the run's own error, if any, is
        the one the caller sees). When the store cannot be reached the final status and the
        records still pending stay in the backlog (one line says where and how to deliver
        them). Returns how many records stay there."""
        if not self:
            return 0
        try:
            self._deliver_left_quietly()
            self._set_status(status, ended=True, end_time_s=end_time_s)
            return self.close(END_TIMEOUT_S)
        except Exception as exc:
            M.setup_logging().warning(f"MLflow run {self.run_id} could not be ended as {status}: {D.reason(exc)}")
            return self._writer().pending()
        finally:
            self._release()

    def close(self, timeout: float = END_TIMEOUT_S) -> int:
        """Deliver this process's records of the run within ``timeout`` seconds; what the
        store does not take by then stays in the backlog. Returns how many records stay."""
        return self._writer().close(timeout) if self else 0

    def deliveries(self) -> Deliveries:
        """What this process's writer of the run has done with the store so far: requests
        the store took, sends that failed and were tried again, records it refused."""
        return self._writer().deliveries if self else Deliveries()

    def claim(self) -> None:
        """This process drives the run: its backlog folder says so while the process lives
        (a lock the system lets go however the process ends), so the next :meth:`settle`
        that finds the run ``RUNNING`` with no driver ends it as ``KILLED``."""
        if not self or (self.uri, self.run_id) in _claims:
            return
        J.prepare(self.backlog, redact_uri(self.uri), self.run_id)
        fd = J.try_lock(self.backlog / J.DRIVER_LOCK)
        if fd is not None:
            _claims[(self.uri, self.run_id)] = fd

    def settle(self, quiet: bool = False) -> list[str]:
        """Deliver what processes that wrote to this run and are gone left in its backlog
        (each record once, the run's final status last); then, if the run's driver is gone
        and the store still says ``RUNNING``, end the run as ``KILLED``. Returns lines that
        say what was done. Raises :class:`TrackingUnavailable` when the store cannot be
        reached (the backlog stays); ``quiet``: logs the lines, or one line saying the
        backlog stays, instead."""
        try:
            lines = self._settle()
        except TrackingUnavailable as exc:
            if not quiet:
                raise
            M.setup_logging().warning(f"{exc}: what run {self.run_id} left in {self.backlog} is delivered later")
            return []
        if quiet:
            for line in lines:
                M.setup_logging().info(line)
        return lines

    def _settle(self) -> list[str]:
        folder = self.backlog
        if not self or not folder.is_dir():
            return []
        lines = []
        delivered = D.deliver_left(self.uri, self.run_id, folder)
        if delivered:
            lines.append(self._delivered_line(delivered))
        lock = folder / J.DRIVER_LOCK
        if lock.exists() and not J.held(lock) and (self.uri, self.run_id) not in _claims:
            status = self._now(lambda: client(self.uri).get_run(self.run_id).info.status)
            if status == "RUNNING":
                self._set_status("KILLED", ended=True)
                if self.close(END_TIMEOUT_S):
                    raise TrackingUnavailable(f"MLflow at {redact_uri(self.uri)} stopped answering")
                lines.append(f"MLflow run {self.run_id} was left RUNNING by a driver that is gone: now KILLED")
            lock.unlink(missing_ok=True)
        J.remove_if_empty(folder)
        return lines

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
        ``registered_model_name`` when given. Returns its ``models:/`` URI; ``None`` when
        the store cannot be reached (the model waits in the backlog, pickled)."""
        if not self:
            return None
        args = (name, registered_model_name, redact_obj(dict(metadata or {})), step)
        w = self._writer()
        if not w.down and w.flush(READ_FLUSH_S):
            try:
                return D.log_model(self.uri, self.run_id, model, *args)
            except Exception as exc:
                if not D.transient(exc):
                    raise
        staged = w.stage(name=f"{name}.pt")
        torch.save(model, self.backlog / staged)  # a relative place is in the backlog, an absolute one stays so
        w.put(dict(zip(("name", "registered_model_name", "metadata", "step"), args), op="model", file=staged))
        return None

    def register_model(self, model_uri: str, name: str) -> str | None:
        """Register ``model_uri`` (one of this run's models) as a new version of ``name``;
        returns the version."""
        if not self:
            return None

        def register() -> str:
            with D.fluent_uri(self.uri):
                return mlflow.register_model(model_uri, name).version

        return self._now(register)

    # ------------------------------------------------------------------ reading

    def fetch(self) -> MlflowRun | None:
        """The run as the store holds it now (MLflow's ``Run``: info, data, inputs)."""
        return self._read(lambda: client(self.uri).get_run(self.run_id)) if self else None

    def connect(self) -> None:
        """Make this process's connection to the store now (one small read; about a second
        of CPU on SQLite the first time), so that a later read in a timed place is cheap.
        Never raises: the reads that matter say what went wrong."""
        if self and not self._writer().down:
            with contextlib.suppress(Exception):
                client(self.uri).search_experiments(max_results=1)

    def status(self) -> str | None:
        """The run's status in the store (one read: call it where it matters; it does not
        wait for this process's records, so it can be called from the training thread);
        ``None`` when the store cannot say (not read at all while this process's writer
        knows the store is unreachable)."""
        if not self or self._writer().down:
            return None
        try:
            return client(self.uri).get_run(self.run_id).info.status
        except Exception as exc:
            if D.transient(exc):
                return None
            raise

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if not self:
            return []
        return [(m.step, m.value) for m in self._read(lambda: client(self.uri).get_metric_history(self.run_id, key))]

    def experiment_id(self) -> str | None:
        """The run's experiment (``None`` when the store cannot be reached)."""
        if self and self._experiment_id is None:
            with contextlib.suppress(TrackingUnavailable):
                self._experiment_id = self.fetch().info.experiment_id
        return self._experiment_id

    def children(self, filter_string: str | None = None) -> list[Run]:
        """The runs nested under this one (and matching ``filter_string``, MLflow's search
        syntax), newest first."""
        if not self:
            return []
        found = self._read(
            lambda: client(self.uri).search_runs(
                [self.experiment_id()],
                filter_string=" and ".join(
                    [f"tags.`{PARENT_TAG}` = '{self.run_id}'", *([filter_string] if filter_string else [])]
                ),
                order_by=["attributes.start_time DESC"],
            )
        )
        return [Run(self.uri, r.info.run_id) for r in found]

    def logged_models(self) -> dict[str, str]:
        """The models logged to this run: name -> ``models:/`` URI."""
        return self._read(lambda: D.logged_models(self.uri, self.run_id)) if self else {}

    # ------------------------------------------------------------------ the writes themselves

    def _writer(self) -> Writer:
        return writer(self.uri, self.run_id, self.backlog)

    def _log_batch(
        self, metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()
    ) -> None:
        """Metrics, params and tags (already redacted), handed to the run's writer."""
        if self and (metrics or params or tags):
            self._writer().put(D.batch_record(metrics, params, tags))

    def _upload(self, path: Path, artifact_path: str | None) -> None:
        """A file or folder into the run's artifacts (a copy, redacted where it holds a
        secret, waits in the backlog folder until it is uploaded)."""
        with _redacted(path) as local:
            staged = self._writer().stage(local)
        self._writer().put({"op": "upload", "file": staged, "artifact_path": artifact_path})

    def _set_status(self, status: str, ended: bool = False, end_time_s: float | None = None) -> None:
        if not self:
            return
        end_ms = int((time.time() if end_time_s is None else end_time_s) * 1000) if ended else None
        self._writer().put(D.status_record(status, ended, end_ms))

    def _deliver_left_quietly(self) -> None:
        """Before the run ends: what this run's other processes (rank 0) left, if the store
        takes it now (else it stays for the next command)."""
        folder = self.backlog
        if J.journals(folder):
            with contextlib.suppress(TrackingUnavailable):
                delivered = D.deliver_left(self.uri, self.run_id, folder)
                if delivered:
                    M.setup_logging().info(self._delivered_line(delivered))

    def _delivered_line(self, delivered: int) -> str:
        return f"delivered the {delivered} record(s) of MLflow run {self.run_id} kept in {self.backlog}"

    def _release(self) -> None:
        fd = _claims.pop((self.uri, self.run_id), None)
        if fd is not None:
            (self.backlog / J.DRIVER_LOCK).unlink(missing_ok=True)
            J.unlock(fd)
            J.remove_if_empty(self.backlog)

    def _read(self, fn: Callable[[], T]) -> T:
        """A read of the store, once this process's records of the run are delivered (unless
        the store is known to be down); raises :class:`TrackingUnavailable` when the store
        cannot be reached."""
        w = self._writer()
        if not w.down:
            w.flush(READ_FLUSH_S)
        return self._now(fn)

    def _now(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if D.transient(exc):
                raise D.unavailable(self.uri, exc) from None
            raise
