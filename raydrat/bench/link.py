"""Two Ray nodes on one machine, joined by a real, bandwidth-limited link.

``TwoNodeLink`` creates two Linux network namespaces (nodes ``a`` and ``b``) joined by a
veth pair (interface ``raydrat0`` on both sides, addresses ``10.213.N.1`` and ``.2``
assigned here, ``lo`` up in both), limits the link in both directions with ``tc`` (a
``tbf`` qdisc on each end; the ``netem`` qdisc is not available on these machines, so only
the bandwidth is limited, not the latency), and starts ``ray start --head`` in ``a`` and
``ray start --address`` in ``b``. Each node advertises one ``raydrat_link_node`` resource:
workers that request 1 of it land one per node (``scaling.worker_resources``). gloo binds
to the veth (``GLOO_SOCKET_IFNAME=raydrat0``, which every Ray worker inherits from its
raylet), so every collective between the two workers crosses the limited link, and so do
Ray's object transfers (the data stream to the remote worker). Commands run in ``a``
(``run`` / ``popen``) with ``RAY_ADDRESS`` set to the head, where the driver can reach it.

Isolation from other Ray instances on the machine:

* each node has a private ``--temp-dir``, and the cluster its own auth token file (a local
  ``ray.init()`` elsewhere on the machine writes ``~/.ray/auth_token`` and ``ray start``
  would then turn token auth on with a token our driver does not have; we set
  ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH`` pointing at our own file);
* ``close()`` never runs ``ray stop`` (it kills every Ray process of the user): it kills
  the processes inside its own two namespaces (``ip netns pids``: the raylets, the GCS, the
  workers and any driver started with ``popen``), then deletes the namespaces, which
  removes the veth pair, then the temp dir. It runs on exit too (``atexit``), and a
  harness killed before it could clean up leaves namespaces named after its pid, which the
  next harness removes.

Needs root (network namespaces) and iproute2's ``ip`` and ``tc``; ``unavailable_reason()``
says in one line why not, and callers fall back to one node.
"""

from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from raydrat.config import ConfigError

HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
"""The GCS's node health check on the link's cluster: what makes a killed node dead to Ray."""
NODE_RESOURCE = "raydrat_link_node"
"""The custom resource each node advertises (1 per node)."""
IFNAME = "raydrat0"
"""The veth interface's name, the same in both namespaces (so one ``GLOO_SOCKET_IFNAME``)."""
GCS_PORT = 6379
NS_PREFIX = "raydrat-link-"
ENV_VAR = "RAYDRAT_LINK"
"""Set in the commands a link runs: what :func:`attached` needs to reach its nodes."""
TEMP_PREFIX = "rdl-"
NODES = ("a", "b")
_instances = itertools.count()


class LinkUnavailable(RuntimeError):
    """This machine cannot host the namespaced nodes; the message says why, in one line."""


class LinkError(RuntimeError):
    """Setting up the link or its Ray nodes failed; the message holds the failing output."""


def _sh(cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise LinkError(f"{' '.join(cmd)} failed (exit {r.returncode}): {_first_line(r.stderr or r.stdout)}")
    return r


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unavailable_reason() -> str | None:
    """``None`` when two namespaced nodes can be made here; else one line saying why not.
    Probes for real: creates (and deletes) a namespace holding a veth pair."""
    if not sys.platform.startswith("linux"):
        return f"two-node link unavailable: network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"two-node link unavailable: creating network namespaces needs root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"two-node link unavailable: the `{tool}` command (iproute2) is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    r = _sh(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"two-node link unavailable: cannot create a network namespace ({_first_line(r.stderr)})"
    try:
        r = _sh(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if r.returncode != 0:
            return f"two-node link unavailable: cannot create a veth pair ({_first_line(r.stderr)})"
    finally:
        _sh(["ip", "netns", "del", probe], check=False)
    return None


def check_rate(rate_mbit, what: str = "--link") -> float:
    """``rate_mbit`` as a positive, finite float (tc itself takes a negative rate and wraps
    it around to 18 million Tbit/s, so this is checked here)."""
    example = f"e.g. {what} 1000,100,20"
    try:
        rate = float(rate_mbit)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {rate_mbit!r}: not a number: give link rates in Mbit/s, {example}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{what} {rate_mbit!r}: a link rate must be a positive number of Mbit/s, {example}")
    return rate


def parse_rates(text: str, what: str = "--link") -> list[float]:
    """``"1000,100,20"`` -> ``[1000.0, 100.0, 20.0]`` (Mbit/s)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(parts):
        raise ConfigError(f"{what} {text!r}: give comma-separated rates in Mbit/s, e.g. {what} 1000,100,20")
    return [check_rate(p, what) for p in parts]


def tbf_args(rate_mbit: float) -> list[str]:
    """``tc ... tbf`` arguments for ``rate_mbit``: the rate in bit/s, a bucket of 1 ms of
    tokens (at least 32 KiB: tbf splits larger GSO packets into segments) and a queue of
    50 ms (at least two buckets)."""
    rate_bit = round(rate_mbit * 1e6)
    byte_rate = rate_bit / 8
    burst = max(32 * 1024, int(byte_rate * 0.001))
    limit = max(2 * burst, int(byte_rate * 0.05))
    return ["rate", f"{rate_bit}bit", "burst", str(burst), "limit", str(limit)]


def _kill_namespace_processes(ns: str, grace_s: float = 2.0) -> None:
    """SIGTERM every process in namespace ``ns``, SIGKILL what is left after ``grace_s``."""

    def pids() -> list[int]:
        r = _sh(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        left = pids()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and pids():
            time.sleep(0.1)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces (and their processes) and temp dirs left by a harness whose
    process is gone (killed before ``close()``); return what was removed."""
    r = _sh(["ip", "netns", "list"], check=False)
    removed = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{re.escape(NS_PREFIX)}(\d+)-(?:\d+-[ab]|probe)", name)
        if m and not _alive(int(m.group(1))):
            _delete_namespace(name)
            removed.append(name)
    for d in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(TEMP_PREFIX)}(\d+)-\w+", d.name)
        if m and d.is_dir() and (d / "auth_token").exists() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


class TwoNodeLink:
    """Two Ray nodes in two network namespaces joined by a ``tc``-limited veth pair.

    ``rate_mbit=None`` leaves the link unlimited (a veth runs at memory speed). Use as a
    context manager, or call ``start()`` and ``close()``::

        with TwoNodeLink(rate_mbit=100) as link:
            link.run([sys.executable, "-m", "raydrat.cli", "train", ...], check=True)
            link.set_rate(20)
    """

    def __init__(
        self,
        rate_mbit: float | None = None,
        cpus_per_node: float = 2,
        object_store_mb: int = 256,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        keep_logs: bool = False,
        what: str = "--link",
        start_ray: bool = True,
    ):
        self.what = what
        self.start_ray = start_ray
        self.rate_mbit = None if rate_mbit is None else check_rate(rate_mbit, what)
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.resources = {NODE_RESOURCE: 1, **(resources or {})}
        self.keep_logs = keep_logs
        seq = next(_instances)
        self.namespace = {n: f"{NS_PREFIX}{os.getpid()}-{seq}-{n}" for n in NODES}
        subnet = (os.getpid() + seq) % 254 + 1
        self.ip = {"a": f"10.213.{subnet}.1", "b": f"10.213.{subnet}.2"}
        self.address = f"{self.ip['a']}:{GCS_PORT}"
        self.temp_dir: Path | None = None
        self._extra_env = dict(env or {})
        self._env: dict[str, str] = {}
        self._made: list[str] = []
        self._started = False

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> TwoNodeLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> TwoNodeLink:
        """Make the namespaces and the link, limit it, start both Ray nodes and wait until
        the cluster shows both. Raises ``LinkUnavailable`` where this machine cannot."""
        reason = unavailable_reason()
        if reason:
            raise LinkUnavailable(reason)
        remove_stale_namespaces()
        atexit.register(self.close)
        self._started = True
        try:
            self._make_link()
            self.set_rate(self.rate_mbit)
            self._prepare_env()
            if self.start_ray:
                self._start_ray()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process in the two namespaces, delete them (and so the veth pair),
        and remove the temp dir (Ray's session files and logs) unless ``keep_logs``."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.close)
        for ns in reversed(self._made):  # b (the worker node) first, then the head
            _delete_namespace(ns)
        self._made.clear()
        if self.temp_dir is not None and not self.keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _make_link(self) -> None:
        a, b = self.namespace["a"], self.namespace["b"]
        for ns in (a, b):
            _sh(["ip", "netns", "add", ns])
            self._made.append(ns)
        _sh(["ip", "-n", a, "link", "add", IFNAME, "type", "veth", "peer", "name", IFNAME, "netns", b])
        for node, ns in self.namespace.items():
            _sh(["ip", "-n", ns, "addr", "add", f"{self.ip[node]}/30", "dev", IFNAME])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", ns, "link", "set", IFNAME, "up"])

    def _prepare_env(self) -> None:
        # short path: Ray's unix socket paths under it must stay below 108 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token),
                "GLOO_SOCKET_IFNAME": IFNAME,
                "RAY_USAGE_STATS_ENABLED": "0",
                # two nodes on one machine are never preempted: no watcher actor
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                # the head declares a silent node dead after about 3 s (Ray's default, 3 s x 5
                # missed health checks, leaves a killed node "alive" for 15-30 s, and Ray Train
                # would place a replacement on it)
                **HEALTH_CHECK_ENV,
                **self._extra_env,
            }
        )
        self._env = env

    def _start_ray(self) -> None:
        self._ray_start("a", ["--head", "--port", str(GCS_PORT), *self._node_args()])
        self.start_node("b")

    def _node_args(self) -> list[str]:
        return [
            "--num-cpus",
            f"{self.cpus_per_node:g}",
            "--num-gpus",
            "0",
            "--resources",
            json.dumps(self.resources),
            "--object-store-memory",
            str(int(self.object_store_mb * 2**20)),
            "--disable-usage-stats",
        ]

    def start_node(self, node: str = "b") -> None:
        """Start the worker node's Ray (again, after :meth:`kill_node`) and wait until the
        cluster shows both nodes' ``raydrat_link_node``."""
        self._ray_start(node, ["--address", self.address, *self._node_args()])
        self._wait_for_cluster()

    def kill_node(self, node: str = "b") -> list[int]:
        """A node lost at once, as a crashed or preempted machine: SIGKILL every process in
        ``node``'s namespace (its raylet, its agents and its Ray workers), with no time to
        clean up; the namespace and the link stay, so :meth:`start_node` can bring it back.
        Returns the pids killed."""
        if node == "a":
            raise ValueError("node a holds the head (the GCS): killing it ends the cluster, not a node")
        pids = list(self.processes(node))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        return pids

    def _ray_start(self, node: str, args: list[str]) -> None:
        # a restarted node gets a fresh temp dir: the dead one's socket files stay behind
        names = itertools.chain([node], (f"{node}{k}" for k in itertools.count(2)))
        name = next(n for n in names if not (self.temp_dir / n).exists())
        log = self.temp_dir / f"ray-start-{name}.log"
        cmd = [
            ray_executable(),
            "start",
            "--node-ip-address",
            self.ip[node],
            "--temp-dir",
            str(self.temp_dir / name),
            *args,
        ]
        with open(log, "w") as out:  # not a pipe: the daemons it forks keep their stdout open
            r = subprocess.run(
                self.command(cmd, node), stdout=out, stderr=subprocess.STDOUT, env=self._env, timeout=180
            )
        if r.returncode != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise LinkError(f"ray start on node {node} ({self.namespace[node]}) failed (exit {r.returncode}): {tail}")

    def _wait_for_cluster(self, timeout_s: float = 60) -> None:
        """A driver in ``a`` sees both nodes' ``raydrat_link_node`` (the worker node is
        registered once ``ray start`` returns; this also proves the head is reachable)."""
        probe = (
            "import ray, sys, time\n"
            "ray.init(logging_level='ERROR')\n"
            f"deadline = time.time() + {timeout_s}\n"
            f"while ray.cluster_resources().get({NODE_RESOURCE!r}, 0) < 2 and time.time() < deadline:\n"
            "    time.sleep(0.2)\n"
            f"sys.exit(0 if ray.cluster_resources().get({NODE_RESOURCE!r}, 0) >= 2 else 3)\n"
        )
        r = self.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout_s + 60)
        if r.returncode != 0:
            raise LinkError(
                f"the two-node cluster at {self.address} did not come up (exit {r.returncode}): "
                f"{' | '.join((r.stderr or r.stdout).strip().splitlines()[-3:])}"
            )

    # -- the link -------------------------------------------------------------------

    def set_rate(self, rate_mbit: float | None) -> None:
        """Limit both directions to ``rate_mbit`` Mbit/s (``None``: unlimited); can be
        changed while the nodes run. A rate tc refuses raises ``ConfigError``."""
        rate = None if rate_mbit is None else check_rate(rate_mbit, self.what)
        for ns in self.namespace.values():
            if rate is None:
                _sh(["tc", "-n", ns, "qdisc", "del", "dev", IFNAME, "root"], check=False)
                continue
            r = _sh(["tc", "-n", ns, "qdisc", "replace", "dev", IFNAME, "root", "tbf", *tbf_args(rate)], check=False)
            if r.returncode != 0:
                raise ConfigError(
                    f"{self.what} {rate:g}: tc refuses this rate ({_first_line(r.stderr)}): "
                    f"give a rate between 0.001 and 10000000 Mbit/s, e.g. {self.what} 1000,100,20"
                )
            applied = self.applied_rate_mbit(ns)
            if applied is not None and abs(applied - rate) > 0.01 * rate:
                raise ConfigError(
                    f"{self.what} {rate:g}: tc applies {applied:g} Mbit/s instead (it keeps "
                    f"whole bytes per second, below 2^64): give a rate between 0.001 and 10000000 Mbit/s"
                )
        self.rate_mbit = rate

    def applied_rate_mbit(self, ns: str) -> float | None:
        """The rate of the ``tbf`` qdisc on ``ns``'s end as tc reports it, or None."""
        r = _sh(["tc", "-j", "-n", ns, "qdisc", "show", "dev", IFNAME], check=False)
        try:
            qdiscs = json.loads(r.stdout or "[]")
        except json.JSONDecodeError:
            return None
        for q in qdiscs:
            if q.get("kind") == "tbf" and "rate" in q.get("options", {}):
                return q["options"]["rate"] * 8 / 1e6  # bytes/s -> Mbit/s
        return None

    # -- running things -------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a driver in ``a``: ``RAY_ADDRESS``, the cluster's token, and
        ``RAYDRAT_LINK``, which :func:`attached` reads to kill and restart node ``b``."""
        described = json.dumps(
            {
                "namespace": self.namespace,
                "ip": self.ip,
                "temp_dir": str(self.temp_dir),
                "cpus_per_node": self.cpus_per_node,
                "object_store_mb": self.object_store_mb,
                "resources": self.resources,
            }
        )
        return {**self._env, "RAY_ADDRESS": self.address, ENV_VAR: described, **(extra or {})}

    def command(self, cmd: Sequence[str], node: str = "a") -> list[str]:
        return ["ip", "netns", "exec", self.namespace[node], *cmd]

    def run(
        self, cmd: Sequence[str], env: dict[str, str] | None = None, node: str = "a", **kw
    ) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd)`` inside namespace ``node`` with ``env()``."""
        return subprocess.run(self.command(cmd, node), env=self.env(env), **kw)

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None, node: str = "a", **kw) -> subprocess.Popen:
        """``subprocess.Popen(cmd)`` inside namespace ``node``; ``close()`` kills it."""
        return subprocess.Popen(self.command(cmd, node), env=self.env(env), **kw)

    def processes(self, node: str) -> dict[int, str]:
        """``pid -> command line`` of every process in ``node``'s namespace (Ray renames
        its workers, e.g. ``ray::RayTrainWorker...``)."""
        r = _sh(["ip", "netns", "pids", self.namespace[node]], check=False)
        out = {}
        for pid in map(int, r.stdout.split()):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            out[pid] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        return out

    def measure_mbit(self, seconds: float = 2.0) -> float:
        """Throughput of one TCP stream from ``a`` to ``b`` in Mbit/s, counted by the
        receiver from its first byte: an instrument independent of Ray and of tc."""
        sink = self.popen(
            [sys.executable, "-m", "raydrat.bench.link", "sink", self.ip["b"]],
            node="b",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            src = self.run(
                [sys.executable, "-m", "raydrat.bench.link", "source", self.ip["b"], str(seconds)],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
            out, err = sink.communicate(timeout=60)
        finally:
            if sink.poll() is None:
                sink.kill()
        if src.returncode != 0 or sink.returncode != 0:
            raise LinkError(f"TCP measurement failed: {_first_line(src.stderr or err)}")
        received, elapsed = map(float, out.split())
        return received * 8 / elapsed / 1e6

    def worker_pids(self, node: str, actor: str = "RayTrainWorker") -> list[int]:
        """Pids of the Ray actors of class ``actor`` running on ``node``."""
        return sorted(pid for pid, cmd in self.processes(node).items() if cmd.startswith(f"ray::{actor}"))


def attached() -> TwoNodeLink | None:
    """In a command a :class:`TwoNodeLink` runs (``run`` / ``popen``): a handle on that link,
    which can :meth:`~TwoNodeLink.kill_node` and :meth:`~TwoNodeLink.start_node` its node
    ``b`` but never closes it (the harness that made it does). ``None`` elsewhere."""
    described = os.environ.get(ENV_VAR)
    if not described:
        return None
    d = json.loads(described)
    net = TwoNodeLink(cpus_per_node=d["cpus_per_node"], object_store_mb=d["object_store_mb"], resources=d["resources"])
    net.namespace, net.ip, net.temp_dir = d["namespace"], d["ip"], Path(d["temp_dir"])
    net.address = f"{net.ip['a']}:{GCS_PORT}"
    net._env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_VAR)}
    return net


def ray_executable() -> str:
    """The ``ray`` CLI of this Python environment."""
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise LinkError("the `ray` command is not installed next to this Python: install ray[default]")
    return found


TCP_PORT = 5201


def _tcp_sink(host: str) -> None:
    """Accept one connection on ``host``; print bytes received and seconds since the first."""
    with socket.create_server((host, TCP_PORT)) as server:
        conn, _ = server.accept()
        with conn:
            chunk = conn.recv(1 << 20)
            first, received = time.perf_counter(), len(chunk)
            while chunk := conn.recv(1 << 20):
                received += len(chunk)
        print(received, max(time.perf_counter() - first, 1e-9))


def _tcp_source(host: str, seconds: float) -> None:
    deadline = time.monotonic() + 10
    while True:  # the sink may still be starting
        try:
            conn = socket.create_connection((host, TCP_PORT), timeout=5)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    buf = b"\0" * (1 << 20)
    end = time.monotonic() + seconds
    with conn:
        while time.monotonic() < end:
            conn.sendall(buf)


if __name__ == "__main__":  # the two ends of measure_mbit
    if sys.argv[1] == "sink":
        _tcp_sink(sys.argv[2])
    else:
        _tcp_source(sys.argv[2], float(sys.argv[3]))
