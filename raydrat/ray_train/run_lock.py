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
    created: bool
    """The folder did not exist before this lock made it."""

    def release(self, keep: bool = True) -> None:
        """Let the folder go. ``keep=False``: remove it too when this lock made it and it holds
        nothing but the lock file (a run refused before it wrote anything)."""
        if self.fd < 0:
            return
        if not keep and self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        os.close(self.fd)
        self.fd = -1


def driver() -> str:
    """This process, as a lock holder names itself."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (made if absent) for this process, or raise :class:`RunFolderBusy`."""
    created = not run_dir.exists()
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
    return RunLock(run_dir, fd, created)
