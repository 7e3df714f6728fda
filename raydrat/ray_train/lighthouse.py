"""The torchft Lighthouse's death under ``sync.engine: torchft``: noticed, and survived.

Ray Train 2.60 runs the Lighthouse as an actor (``LighthouseServerActor``) started once per
run. Measured without this module: when that actor dies, each replica's next quorum fails
inside torchft's Rust manager, which does not hand the failure to Python; every replica
waited in that quorum for the 9 minutes watched (``QUORUM_TIMEOUT`` is 600 s), and with the
replicas ended, no replacement trained (Ray Train's backend keeps asking the dead actor for
its address).

* :class:`LighthouseWatch`: in a worker, a thread that connects to the Lighthouse's port
  every second; when nothing has answered for :data:`GONE_AFTER_S`, it logs one line, leaves
  it in the run's directory and ends the worker's process, so Ray Train sees the replica
  group fail (all of them do);
* :func:`crash_cause`: that line, for the run's one-line error when no restart was left
  (``train.max_failures``) and the death Ray Train reports is such a replica's;
* :func:`torch_config`: Ray Train's ``TorchftConfig`` whose backend starts a new
  Lighthouse when the one it started is dead, so the restarted groups (every replica, from
  the newest complete checkpoint) have one to meet at.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

import ray
import ray.util
from ray.exceptions import GetTimeoutError, RayActorError
from ray.train.v2._internal.constants import TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR
from ray.train.v2.torch.torchft_config import TorchftConfig, _TorchftBackend

from raydrat import crash
from raydrat.core import metrics as M
from raydrat.core.exceptions import walk_exceptions

GONE_AFTER_S = 10.0
"""How long the Lighthouse's port may refuse or ignore connections before a replica gives up
on it (a live Lighthouse accepts at once, even on a loaded machine)."""
CHECK_EVERY_S = 1.0
ASK_TIMEOUT_S = 30.0
"""How long the controller waits for the Lighthouse actor to say its address."""
LOST_FILE = "lighthouse-lost-{pid}"
"""Left in the run's directory by a replica that ended because the Lighthouse was gone."""

logger = logging.getLogger(__name__)


def reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``address`` (``http://host:port``) opens."""
    url = urlparse(address)
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            return True
    except OSError:
        return False


class LighthouseWatch:
    """Checks the Lighthouse at ``address`` (default: ``$TORCHFT_LIGHTHOUSE``, set by Ray
    Train) from a daemon thread until :meth:`stop`; ``on_gone`` (default: log one line, write
    it to ``run_dir``/:data:`LOST_FILE` and end this process with status 1) runs when it has
    been unreachable for ``gone_after_s``."""

    def __init__(self, run_dir: str, address: str | None = None, gone_after_s: float = GONE_AFTER_S, on_gone=None):
        self.run_dir = run_dir
        self.address = address or os.environ[TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR]
        self.gone_after_s = gone_after_s
        self.on_gone = on_gone or self._exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lighthouse-watch", daemon=True)

    def start(self) -> LighthouseWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_seen = time.monotonic()
        while not self._stop.wait(CHECK_EVERY_S):
            if reachable(self.address):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen >= self.gone_after_s and not self._stop.is_set():
                self.on_gone()
                return

    def _exit(self) -> None:
        line = (
            f"the torchft Lighthouse at {self.address} has not answered for {self.gone_after_s:.0f} s:"
            " this replica ends so that Ray Train restarts every replica from the newest complete checkpoint"
        )
        M.setup_logging().error(line)
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.run_dir) / LOST_FILE.format(pid=os.getpid())).write_text(line + "\n")
        finally:
            os._exit(1)


def crash_cause(run_dir: str | os.PathLike, exc: BaseException) -> str | None:
    """The one-line cause of a run's crash ``exc`` when the process whose death it reports
    ended because the Lighthouse was gone (its :data:`LOST_FILE` in ``run_dir``), else None."""
    dead = {pid for e in walk_exceptions(exc) for pid in crash.PID.findall(str(e))}
    for path in Path(run_dir).glob(LOST_FILE.format(pid="*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid in dead:
            return (
                f"the torchft Lighthouse actor died and no restart was left (train.max_failures): replica pid {pid}"
                " found it gone; raise train.max_failures to at least the number of workers so that the replicas"
                " come back with a new Lighthouse, or resume"
            )
    return None


def by_ip(address: str, ip: str) -> str:
    """``address`` (``http://HOST:PORT``) with ``ip`` for its host. torchft advertises its
    servers by ``socket.gethostname()``, which other nodes may not resolve, or resolve to
    themselves (a container's or a namespace's ``/etc/hosts``); Ray's node IP reaches them."""
    url = urlsplit(address)
    host = f"[{ip}]" if ":" in ip else ip
    return urlunsplit(url._replace(netloc=f"{host}:{url.port}"))


def alive(actor) -> bool:
    """Whether the Lighthouse actor answers (a dead one raises ``RayActorError``)."""
    try:
        ray.get(actor.address.remote(), timeout=ASK_TIMEOUT_S)
        return True
    except (RayActorError, GetTimeoutError):
        return False


class _Backend(_TorchftBackend):
    """Ray Train's torchft backend, with a new Lighthouse when the old one died (Ray Train's own
    keeps asking the dead actor for its address: no replacement trains)."""

    def _maybe_create_lighthouse_actor(self, backend_config: TorchftConfig) -> str:
        if self.lighthouse_actor is not None and not alive(self.lighthouse_actor):
            logger.warning("the torchft Lighthouse actor is dead: starting a new one")
            self.lighthouse_actor = None
        # the actor runs on this (the controller's) node: its address by the node's Ray IP
        return by_ip(super()._maybe_create_lighthouse_actor(backend_config), ray.util.get_node_ip_address())


class RestartingTorchftConfig(TorchftConfig):
    """``TorchftConfig`` with :class:`_Backend`."""

    @property
    def backend_cls(self):
        return _Backend


def torch_config(lighthouse_kwargs: dict, backend: str) -> TorchftConfig:
    return RestartingTorchftConfig(lighthouse_kwargs=dict(lighthouse_kwargs), backend=backend)
