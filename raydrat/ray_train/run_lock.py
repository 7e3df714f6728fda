"""One driver per run folder.

A run writes into ``train.storage_path/<run name>`` (Ray Train's checkpoints, raydrat's run
record). The driver that writes there holds an exclusive lock on ``.raydrat.lock`` in that
folder (``flock``: the kernel lets it go when the process ends, however it ends), with its
pid and host written inside. A second driver that asks for the same folder is refused at
once, and told who holds it. Only the standard library is used here.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".raydrat.lock"


class RunFolderBusy(Exception):
    """Another process holds the run folder's lock (``holder``: its pid and host, as it wrote them)."""

    def __init__(self, run_dir: Path, holder: str):
        super().__init__(f"{run_dir} is in use by {holder}")
        self.run_dir, self.holder = run_dir, holder


@dataclass
class RunLock:
    run_dir: Path
    fd: int
    made: Path | None
    """The outermost folder this lock made (``run_dir`` or a parent of it, such as the storage
    root), or None when ``run_dir`` existed."""

    def release(self, keep: bool = True) -> None:
        """Let the folder go. ``keep=False``: remove what this lock made too (the run folder and
        the parents it made) when the run folder holds nothing but the lock file (a run refused
        before it wrote anything)."""
        if self.fd < 0:
            return
        if not keep and self.made is not None and {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE}:
            _remove_made(self.run_dir, self.made)
        os.close(self.fd)
        self.fd = -1


def _remove_made(run_dir: Path, made: Path) -> None:
    """Remove ``run_dir``, then each parent up to ``made`` that is left empty (another driver
    may have put its own run folder beside this one meanwhile)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir
    while folder != made:
        folder = folder.parent
        try:
            folder.rmdir()
        except OSError:  # not empty: another run's folder is there
            return


def driver() -> str:
    """This process, as a lock holder names itself."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (made if absent) for this process, or raise :class:`RunFolderBusy`."""
    made = next((d for d in reversed([run_dir, *run_dir.parents]) if not d.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderBusy(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{driver()}\n".encode(), 0)
    return RunLock(run_dir, fd, made)
