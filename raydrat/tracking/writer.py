"""A run's writes from one process, off the caller's thread: training hands a record over
and goes on, whatever the store does.

:class:`Writer` holds one run's records in order, in memory (at most
:data:`MEMORY_RECORDS`), and delivers them from a thread of its own, in order (consecutive
batches of metrics as one request). When the store cannot be reached (or falls that far
behind), every record from the undelivered one on goes to the run's backlog on disk
(:mod:`raydrat.tracking.journal`) instead, so memory stays bounded however long the outage
lasts; the thread retries the oldest records (after 1 s, then twice as long each time, up to
:data:`RETRY_MAX_S`) and, once the store takes them, delivers the backlog in order, each
record acknowledged in the journal as it goes, so none is sent twice (the records in flight
when the store went away are checked against it first). An outage prints one line when it
starts and one when its backlog is delivered.

MLflow's own asynchronous logging (``log_batch(synchronous=False)``) was measured against
this on a real ``mlflow server`` killed for 40-90 s: it keeps no backlog (with MLflow's HTTP
retries off it dropped every batch logged during the outage and most of those queued before
it, one error line per batch; with its default retries it kept them only while the retries
lasted, about 4 minutes, in memory, and an end of run waits for them), so it does not serve.

A record the store refuses (a 4xx answer) is dropped with one line. :meth:`Writer.close`
waits a short while for what is pending and leaves the rest in the backlog, which the next
command that touches the run delivers (:func:`raydrat.tracking.delivery.deliver_left`).
MLflow's own HTTP retries are off (:func:`raydrat.tracking.store.client`): the writer
retries, on its own thread.
"""

from __future__ import annotations

import atexit
import collections
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import raydrat.tracking.journal as J
from raydrat.core import metrics as M
from raydrat.redact import redact_uri
from raydrat.tracking.delivery import group_of, is_end, merged, reason, refused, send, transient

MEMORY_RECORDS = 1000
"""Records held in memory before the rest wait on disk (a store falling behind)."""
RETRY_MAX_S = 10.0
"""The longest wait between two tries while the store is unreachable."""
IDLE_EXIT_S = 30.0
"""A writer's thread ends after this long with nothing to deliver (the next record starts one)."""
CLOSE_JOIN_S = 15.0
"""How long closing waits for a request in flight (MLflow's HTTP timeout, set in store.py, is 10 s)."""


@dataclass(frozen=True)
class Deliveries:
    """What a writer's thread has done with the store so far (``raydrat bench tracking``
    reports it)."""

    requests: int = 0
    """Sends the store took: one record, or consecutive batches of metrics as one request."""
    failed: int = 0
    """Sends that failed on a store unreachable or overloaded (each tried again later)."""
    refused: int = 0
    """Records the store refused (dropped, one warning line each)."""
    first_error: str = ""
    """Why the first failed or refused send failed, in a few words."""


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


class Writer:
    """The records of run ``run_id`` in store ``uri`` from this process (see the module)."""

    def __init__(self, uri: str, run_id: str, folder: Path):
        self.uri, self.run_id, self.folder = uri, run_id, folder
        self._cv = threading.Condition()
        self._memory: collections.deque[dict[str, Any]] = collections.deque()
        self._journal: J.Journal | None = None
        self._current: list[dict[str, Any]] = []  # the journal records being delivered
        self._busy = False  # a record is being sent
        self._seq = 0
        self._generation = 0  # closing starts a new one: a thread of an older one stops
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._end_pending = False
        self._notes: list[str] = []  # lines to print, once the lock is let go
        self._dropped = 0
        self._cannot_write = False
        self._staging: Path | None = None  # copies of files waiting in memory records
        self._deliveries = Deliveries()

    # ------------------------------------------------------------------ the caller's side

    def put(self, record: dict[str, Any]) -> None:
        """Hand ``record`` over (never waits on the store, never raises: a record that cannot
        be kept, the disk being full, is dropped with one line)."""
        with self._cv:
            self._seq += 1
            record["seq"] = self._seq
            try:
                if self._journal is None and len(self._memory) >= MEMORY_RECORDS:
                    self._spill("is slower than training")
                if self._journal is not None:
                    self._journal.append(self._kept(record))
                else:
                    self._memory.append(record)
                self._end_pending = self._end_pending or is_end(record)
            except OSError as exc:
                self._lost(exc, record)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._deliver,
                    args=(self._generation,),
                    name=f"raydrat-tracking-{self.run_id[:8]}",
                    daemon=True,
                )
                self._thread.start()
            self._cv.notify_all()
        self._say()

    def stage(self, source: Path | None = None, name: str | None = None) -> str:
        """A copy of ``source`` (or an empty place for a file named ``name``) that stays until
        the record naming it is delivered: in the backlog folder while records wait there,
        else in a temporary folder of this writer (moved to the backlog if they come to wait).
        What a record names as its ``file``."""
        with self._cv:
            if self._journal is not None:
                base = self.folder
            else:
                if self._staging is None or not self._staging.is_dir():
                    self._staging = Path(tempfile.mkdtemp(prefix="raydrat-tracking-"))
                base = self._staging
        path = J.stage(base, source) if source is not None else J.staging(base, name)
        return str(path.relative_to(self.folder)) if base == self.folder else str(path)

    @property
    def down(self) -> bool:
        """Whether the store is known to be unreachable (an outage is under way)."""
        return self._down_since is not None

    @property
    def deliveries(self) -> Deliveries:
        """What this writer's thread has done with the store so far."""
        with self._cv:
            return self._deliveries

    def pending(self) -> int:
        """Records handed over and not delivered yet."""
        with self._cv:
            return self._pending()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every record handed over to be delivered (a
        writer waiting to retry tries at once); whether it was."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._retry_at = 0.0
            self._cv.notify_all()
            while self._pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self, timeout: float) -> int:
        """Deliver what is pending within ``timeout`` seconds, then stop; what is left stays
        in the backlog (one line says where). Returns how many records are left there."""
        self.flush(timeout)
        with self._cv:
            self._generation += 1
            thread, self._thread = self._thread, None
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_JOIN_S)
        self._say()
        with self._cv:
            left, ending, down = self._pending(), self._end_pending, self._down_since is not None
            if left and self._journal is None:
                self._spill(None)
            folder = self.folder
            if self._journal is not None:
                self._journal.close(remove=not left)
                self._journal = None
            J.remove_if_empty(folder)
            self._memory.clear()
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            self._current, self._down_since, self._end_pending = [], None, False
        if left:
            status = ", its final status among them," if ending else ""
            left = max(left, J.count_pending(folder))  # with what the run's other processes left there
            M.setup_logging().warning(
                f"MLflow at {redact_uri(self.uri)} {'unreachable' if down else 'too slow'}: {left} record(s) of run "
                f"{self.run_id}{status} wait "
                f"in {folder}; `raydrat tracking sync {folder}` delivers them, as does the next resume or eval "
                "of the run"
            )
        return left

    def _say(self) -> None:
        """Print the lines noted under the lock (never while holding it: a console that
        blocks must not block the callers)."""
        with self._cv:
            notes, self._notes = self._notes, []
        for note in notes:
            M.setup_logging().warning(note)

    # ------------------------------------------------------------------ under the lock

    def _lost(self, exc: OSError, record: dict[str, Any] | None = None) -> None:
        """The backlog cannot be written: ``record`` (if given) is dropped; one line says so."""
        if record is not None:
            self._dropped += 1
            J.unstage(self.folder, record)
        if not self._cannot_write:
            self._cannot_write = True
            self._notes.append(
                f"MLflow records of run {self.run_id} cannot wait on disk ({reason(exc)} in {self.folder}): "
                "while the store is away, the newest ones are dropped"
            )

    def _pending(self) -> int:
        n = len(self._memory)
        if self._journal is not None:
            n += self._journal.appended - self._journal.acknowledged
        return n

    def _spill(self, why: str | None) -> None:
        """From now on every record waits in the journal: the ones in memory first."""
        if self._busy and self._journal is None:  # in flight, they may arrive: checked before they are sent again
            for record in self._head():
                record["tried"] = True
        J.prepare(self.folder, redact_uri(self.uri), self.run_id)
        self._journal = J.Journal.create(self.folder)
        for record in self._memory:
            self._journal.append(self._kept(record))
        self._memory.clear()
        if why:
            self._notes.append(
                f"MLflow at {redact_uri(self.uri)} {why}: {self._journal.appended} record(s) of run {self.run_id} "
                f"wait in {self._journal.path} until it takes them (nothing waits for it)"
            )

    def _kept(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record``, the file it names moved into the backlog folder if it was staged in this
        writer's temporary folder (staged before the records came to wait in the journal:
        that folder goes when the writer closes)."""
        if record.get("file") and Path(record["file"]).is_absolute():
            record["file"] = J.keep(self.folder, Path(record["file"]))
        return record

    def _head(self) -> list[dict[str, Any]]:
        """The next records to send (the same until they are delivered): one, or consecutive
        batches of metrics alone, sent as one request (a backlog is delivered at the pace
        of requests, not of training's steps); a journal all delivered is removed (the end
        of an outage)."""
        if self._current:
            return self._current
        if self._journal is not None:
            self._current = group_of(self._journal.peek, self._journal.next_pending)
            if self._current:
                return self._current
            if self._journal.appended == self._journal.acknowledged:
                self._caught_up()
        memory = iter(self._memory)
        ahead: list[dict[str, Any]] = []

        def peek() -> dict[str, Any] | None:
            if not ahead:
                ahead.append(next(memory, None))
            return ahead[0]

        return group_of(peek, lambda: ahead.pop())

    def _caught_up(self) -> None:
        journal, self._journal = self._journal, None
        journal.close(remove=True)
        J.remove_if_empty(self.folder)
        if self._down_since is not None:
            took = _duration(time.monotonic() - self._down_since)
            self._notes.append(
                f"MLflow at {redact_uri(self.uri)} reachable again after {took}: the {journal.appended} record(s) "
                f"of run {self.run_id} kept meanwhile are delivered"
            )
            self._down_since = None

    def _delivered(self, group: list[dict[str, Any]]) -> None:
        if self._memory and self._memory[0] is group[0]:
            for _ in group:
                self._memory.popleft()
        else:  # they were in the journal (read from it, or moved there while in flight)
            for record in group:
                self._journal.ack(record["seq"])
            self._current = []
        self._end_pending = self._end_pending and not any(is_end(r) for r in group)
        for record in group:
            J.unstage(self.folder, record)
        if any(r.get("file") for r in group) and self._journal is None and not self._memory:
            J.remove_if_empty(self.folder)

    # ------------------------------------------------------------------ the writer's thread

    def _next(self, generation: int) -> list[dict[str, Any]] | None:
        """The records to send once their time has come; none when there are lines to print
        first; ``None`` when this thread should end (closed, or idle)."""
        while generation == self._generation:
            group = self._head()
            wait = self._retry_at - time.monotonic()
            if group and wait <= 0:
                self._busy = True
                return group
            if self._notes:
                return []
            if not self._cv.wait(wait if group else IDLE_EXIT_S) and not group:
                if not self._head() and not self._notes and generation == self._generation:
                    self._thread = None
                    return None
        return None

    def _deliver(self, generation: int) -> None:
        backoff = 0.0
        while True:
            self._say()
            with self._cv:
                group = self._next(generation)
            if group is None:
                self._say()
                return
            if not group:
                continue
            record = merged(group)
            error: BaseException | None = None
            try:
                send(self.uri, self.run_id, self.folder, record, maybe_sent=record.get("tried", False))
            except Exception as exc:
                error = exc
            with self._cv:
                self._busy = False
                if generation != self._generation:  # closed meanwhile: the backlog keeps the records
                    return
                self._count(group, error)
                if error is not None and transient(error):
                    backoff = min(RETRY_MAX_S, max(1.0, 2 * backoff))
                    self._retry_at = time.monotonic() + backoff
                    self._failed(group, error)
                    continue
                if error is not None:
                    refused(self.run_id, record, error)
                self._delivered(group)
                backoff = 0.0
                self._cv.notify_all()

    def _count(self, group: list[dict[str, Any]], error: BaseException | None) -> None:
        d = self._deliveries
        if error is None:
            self._deliveries = replace(d, requests=d.requests + 1)
            return
        first = d.first_error or reason(error)
        if transient(error):
            self._deliveries = replace(d, failed=d.failed + 1, first_error=first)
        else:
            self._deliveries = replace(d, refused=d.refused + len(group), first_error=first)

    def _failed(self, group: list[dict[str, Any]], error: BaseException) -> None:
        """The store could not be reached: the records wait in the journal from now on."""
        for r in group:
            r["tried"] = True
        if self._journal is None:
            try:
                self._spill(None)
            except OSError as exc:  # no journal: they wait in memory (new ones are dropped once it is full)
                self._lost(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            where = self._journal.path if self._journal is not None else "memory"
            self._notes.append(
                f"MLflow at {redact_uri(self.uri)} unreachable ({reason(error)}): the records of run {self.run_id} "
                f"wait in {where} until it returns (nothing waits for it)"
            )


_writers: dict[tuple[str, str], Writer] = {}
_lock = threading.Lock()


def writer(uri: str, run_id: str, folder: Path) -> Writer:
    """The one writer of run ``run_id`` in this process (made on first use)."""
    with _lock:
        found = _writers.get((uri, run_id))
        if found is None:
            found = _writers[(uri, run_id)] = Writer(uri, run_id, folder)
        return found


@atexit.register
def _close_all() -> None:
    """At exit, every writer delivers within a few seconds or leaves its backlog on disk."""
    for w in list(_writers.values()):
        if w.pending():
            w.close(timeout=2.0)
