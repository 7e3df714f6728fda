"""A run's backlog on disk: the records one process could not deliver to its store yet.

A backlog is a folder (the run directory's ``tracking-backlog/``, else one per run under
:func:`default_folder`) holding:

* ``store.json``: the store and run the records belong to (the URI without its password);
* one journal per process that wrote there, ``journal-<host>-<pid>.jsonl``: JSON lines,
  each a record (``{"seq": N, "op": ...}``) or the acknowledgement of one (``{"ack": N}``),
  written once the store took it. The pending records are the unacknowledged ones, in
  order; a journal whose records are all acknowledged is removed;
* ``files/``: the copies of the files that waiting records name (removed once delivered;
  while the store answers they wait in a temporary folder instead);
* ``driver.lock``: held (``flock``) by the process that drives the run while it lives.

The process that writes a journal holds an exclusive ``flock`` on it, so another process
(``raydrat tracking sync``, a resume) delivers only the journals of processes that are gone,
and two deliverers never replay one journal twice. Only the standard library is used here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BACKLOG_DIR = "tracking-backlog"
"""The folder of a run directory that keeps the run's records while the store is away."""
STORE_FILE = "store.json"
FILES = "files"
DRIVER_LOCK = "driver.lock"
JOURNAL_GLOB = "journal-*.jsonl"


def backlog_in(run_dir: str | Path) -> Path:
    """The backlog folder of the run whose directory is ``run_dir``."""
    return Path(run_dir) / BACKLOG_DIR


def default_folder(run_id: str) -> Path:
    """Where the backlog of a run with no run directory goes (``$XDG_CACHE_HOME`` or
    ``~/.cache``, ``raydrat/tracking/<run id>``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "raydrat" / "tracking" / run_id


def describe(folder: Path) -> dict[str, Any] | None:
    """The ``store.json`` of a backlog folder (``tracking_uri``, ``run_id``), or ``None``."""
    try:
        return json.loads((folder / STORE_FILE).read_text())
    except (OSError, ValueError):
        return None


def prepare(folder: Path, uri_shown: str | None, run_id: str) -> None:
    """Create ``folder`` and its ``store.json`` (``uri_shown``: the URI without its password)."""
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / STORE_FILE
    if not store.exists():
        store.write_text(json.dumps({"tracking_uri": uri_shown, "run_id": run_id}, indent=2) + "\n")


def staging(folder: Path, name: str) -> Path:
    """A new place for a file named ``name`` under ``folder/files/``."""
    target = folder / FILES / uuid.uuid4().hex / name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def stage(folder: Path, source: Path) -> Path:
    """A copy of the file or folder ``source`` under ``folder/files/``."""
    target = staging(folder, source.name)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def keep(folder: Path, staged: Path) -> str:
    """Move a copy staged elsewhere (by :func:`staging`) into ``folder/files/``; its path
    relative to ``folder`` (what a record in the folder's journals names)."""
    target = folder / FILES / staged.parent.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged.parent), str(target))
    return str((target / staged.name).relative_to(folder))


def unstage(folder: Path, record: dict[str, Any]) -> None:
    """Remove the staged copy a delivered record named (if any: relative to ``folder``, or
    absolute), and ``folder/files/`` once empty."""
    rel = record.get("file")
    if not rel:
        return
    shutil.rmtree((folder / rel).parent, ignore_errors=True)
    with contextlib.suppress(OSError):
        (folder / FILES).rmdir()


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its file descriptor, or
    ``None`` when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class Journal:
    """One process's journal in a backlog folder, locked by it while open. Records are
    appended (:meth:`append`), read back in order (:meth:`next_pending`) and acknowledged
    (:meth:`ack`); a journal opened on a file another process left resumes where that
    process stopped (its unacknowledged records)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd
        self._out = open(path, "a", encoding="utf-8")
        self._in = open(path, encoding="utf-8")
        self._acked: set[int] = set()
        self.appended = 0
        self.acknowledged = 0

    @classmethod
    def create(cls, folder: Path) -> Journal:
        """A new journal of this process in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"journal-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        fd = try_lock(path)
        assert fd is not None, f"a new journal is locked by another process: {path}"
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path) -> Journal | None:
        """The journal ``path`` left by another process, locked for delivery; ``None`` when
        its process (or another deliverer) still holds it."""
        fd = try_lock(path)
        if fd is None:
            return None
        journal = cls(path, fd)
        journal._acked = {r["ack"] for r in _lines(path) if "ack" in r}
        return journal

    def append(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()
        self.appended += 1

    def ack(self, seq: int) -> None:
        self._out.write(json.dumps({"ack": seq}) + "\n")
        self._out.flush()
        self._acked.add(seq)
        self.acknowledged += 1

    def next_pending(self) -> dict[str, Any] | None:
        """The next unacknowledged record after the last one read, or ``None`` at the end
        (so far: records appended later are read by a later call)."""
        while True:
            pos = self._in.tell()
            line = self._in.readline()
            if not line:
                return None
            if not line.endswith("\n"):  # a line still being written (or cut off by a crash)
                self._in.seek(pos)
                return None
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "seq" in record and record["seq"] not in self._acked:
                return record

    def peek(self) -> dict[str, Any] | None:
        """The record :meth:`next_pending` would return, left unread."""
        pos = self._in.tell()
        record = self.next_pending()
        self._in.seek(pos)
        return record

    def pending(self) -> list[dict[str, Any]]:
        """Every unacknowledged record from the last one read on (reads to the end)."""
        out = []
        while (record := self.next_pending()) is not None:
            out.append(record)
        return out

    def close(self, remove: bool = False) -> None:
        self._out.close()
        self._in.close()
        if remove:
            self.path.unlink(missing_ok=True)
        unlock(self._fd)


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def journals(folder: Path) -> list[Path]:
    """The journals in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob(JOURNAL_GLOB), key=lambda p: p.stat().st_mtime)


def count_pending(folder: Path) -> int:
    """How many records the journals in ``folder`` hold undelivered (read without locking)."""
    total = 0
    for path in journals(folder):
        lines = list(_lines(path))
        acked = {r["ack"] for r in lines if "ack" in r}
        total += sum(1 for r in lines if "seq" in r and r["seq"] not in acked)
    return total


def remove_if_empty(folder: Path) -> None:
    """Remove a backlog folder that holds nothing left to deliver (and no live driver)."""
    if journals(folder) or (folder / FILES).exists() or held(folder / DRIVER_LOCK):
        return
    shutil.rmtree(folder, ignore_errors=True)


def held(path: Path) -> bool:
    """Whether a live process holds the lock ``path`` (a missing file is held by none)."""
    if not path.exists():
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    unlock(fd)
    return False
