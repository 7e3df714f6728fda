"""Services on loopback for benches and tests: :func:`free_port`, and a real ``mlflow server``
on a loopback port (:class:`MlflowServer`): its backend store (an SQLite file under its
folder unless another is named), artifacts proxied to a folder beside it, its log in
``server.log``. Started, killed (an outage: nothing answers on the port) and started again
on the same port and store; a context manager as well. Used by ``bench tracking`` and by the
tests of tracking outages and secrets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 300.0
"""How long a start may take: several workers importing MLflow on a loaded machine."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` over ``root``; ``backend_uri`` defaults to ``sqlite:///ROOT/store.db``;
    ``env`` adds to its environment (a database password, never on its command line)."""

    def __init__(
        self,
        root: Path,
        backend_uri: str | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        self.root = Path(root)
        self.backend_uri = backend_uri or f"sqlite:///{self.root / 'store.db'}"
        self.workers, self.env = workers, env or {}
        self.port = port or free_port()
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
        """Start it (on the same port and store as before, if it ran) and wait until it
        answers ``/health``; raises ``RuntimeError`` with the end of its log if it does not."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        with self.log.open("a") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its uvicorn workers go with it
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    def kill(self) -> None:
        """Kill it at once, its workers with it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
