"""What a crash says: one ``raydrat: error:`` line naming the cause and the place.

A run that fails after it started training ends with :class:`RunCrashed` (raised by
:func:`raydrat.ray_train.trainer.run_training`): the cause in one line
(:func:`describe`), the run, its newest complete checkpoint and the partial checkpoints that
were removed; the CLI adds the exact command that resumes it. The causes told apart:

* the disk filling up (``ENOSPC`` anywhere in the chain): the path, and the free space left;
* Ray's memory monitor killing a worker: the node, the memory in use and its limit;
* a worker process killed by a signal (the kernel's OOM killer, ``kill -9``): the node and
  this machine's memory limit;
* a node lost from the cluster: the node;
* anything else: the innermost error, as ``Type: first line``.

Ray failing to start is :class:`RayStartError` (raised by
:func:`raydrat.ray_session.ensure_ray` after one retry). Only the standard library is used
here: Ray's exceptions are recognised by name and text, so the CLI imports this module at
once and ``raydrat --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raydrat.core.exceptions import walk_exceptions

log = logging.getLogger("raydrat")

NO_SPACE = "No space left on device"
RAY_OOM = re.compile(
    r"Memory on the node \(IP: (?P<ip>[^,]+), ID: [^)]+\).*? was (?P<used>[\d.]+\s*[KMGT]?B)(?: used)? / "
    r"(?P<total>[\d.]+\s*[KMGT]?B)(?: limit)? \((?P<frac>[\d.]+)\)"
)
"""Ray's memory monitor's account of a kill (the raylet's text, in the error a task gets)."""
ACTOR_DIED = "The actor died unexpectedly"
"""Ray's account of an actor whose process died (a trial, a training worker)."""
NODE_LOST = re.compile(
    r"(NodeDiedError|node (?:\S+ )?(?:has )?(?:died|been marked dead|is dead|was terminated)|owner's node died)", re.I
)
PID = re.compile(r"\bpid: (\d+)")
CLASS_NAME = re.compile(r"\bclass_name: (\w+)")
ACTORS = {"ImplicitFunc": "the trial's process", "RayTrainWorker": "a training worker's process"}
"""Whose process a Ray actor class is (a Tune trial's function, a Ray Train worker)."""
NODE_IP = re.compile(r"\b(?:ip|IP|node_ip|address)[:= ]+\(?(\d{1,3}(?:\.\d{1,3}){3})")


class RayStartError(Exception):
    """Ray could not start (or join) a cluster, twice: the message is the whole story."""


@dataclass
class RunCrashed(Exception):
    """A run that failed while training (the original error is ``__cause__``)."""

    cause: str
    """One line: what failed and where."""
    run_name: str
    checkpoint: str | None
    """The newest complete checkpoint (``checkpoint_X (step N)``), or None."""
    removed: list[str] = field(default_factory=list)
    """Incomplete checkpoints removed after the crash."""
    details: str | None = None
    """Where the full traceback was written."""

    def __post_init__(self) -> None:
        super().__init__(self.cause)

    def __str__(self) -> str:
        return self.cause


def first_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def innermost(exc: BaseException) -> BaseException:
    """The innermost error of a chain (Ray's wrappers included), preferring one that is not
    Ray's own."""
    leaves = [
        e
        for e in walk_exceptions(exc)
        if e.__cause__ is None
        and e.__context__ is None
        and getattr(e, "cause", None) is None
        and not getattr(e, "worker_failures", None)
        and not getattr(e, "errors", None)
    ]
    return next((e for e in leaves if not type(e).__module__.startswith("ray")), leaves[-1] if leaves else exc)


def _texts(exc: BaseException) -> list[str]:
    return [f"{type(e).__name__}: {e}" for e in walk_exceptions(exc)]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_space(path: str | os.PathLike) -> str:
    """``X free of Y`` on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)}"


def memory_limit() -> str:
    """This machine's (or container's) memory limit: the cgroup's when one is set, else the RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            value = int(Path(path).read_text().strip())
            if value < 1 << 60:
                return f"memory limit {fmt_bytes(value)} (cgroup)"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return f"memory {fmt_bytes(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} (no cgroup limit)"
    return "memory limit unknown"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f}, {five:.1f}, {fifteen:.1f} on {os.cpu_count()} CPUs"


def disk_full(exc: BaseException) -> OSError | str | None:
    """The ``ENOSPC`` error in the chain (or the text of one that crossed a process)."""
    for e in walk_exceptions(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
    for text in _texts(exc):
        if NO_SPACE in text or "[Errno 28]" in text:
            return text
    return None


def _node(text: str) -> str:
    m = NODE_IP.search(text)
    return f"node {m.group(1)}" if m else "its node"


def process_death(exc: BaseException) -> str | None:
    """``<whose> process (pid N on node IP) died: ...`` when ``exc`` says a Ray actor's process
    died (killed, or crashed), else None."""
    text = next((t for t in _texts(exc) if ACTOR_DIED in t), None)
    if text is None:
        return None
    cls, pid = CLASS_NAME.search(text), PID.search(text)
    whose = ACTORS.get(cls.group(1), f"Ray actor {cls.group(1)}'s process") if cls else "a Ray actor's process"
    where = f"pid {pid.group(1)} on {_node(text)}" if pid else _node(text)
    return f"{whose} ({where}) died: killed (the kernel's OOM killer, or a kill -9) or crashed; this machine has {memory_limit()}"


def describe(exc: BaseException, storage: str | os.PathLike) -> str:
    """The crash ``exc`` in one line: cause, place and what to do (``storage``: where the
    run writes its checkpoints, for a full disk without a path of its own)."""
    full = disk_full(exc)
    if full is not None:
        path = getattr(full, "filename", None) or str(storage)
        return (
            f"disk full: no space left on device writing to {path} ({free_space(path)}); free space there "
            f"(or set train.storage_path to a disk with room), then resume"
        )
    texts = _texts(exc)
    for text in texts:
        m = RAY_OOM.search(text)
        if m:
            return (
                f"out of memory: Ray's memory monitor killed a training worker on node {m['ip']}: memory in use "
                f"{m['used']} of its {m['total']} limit ({float(m['frac']):.0%}, over RAY_memory_usage_threshold); "
                "lower train.batch_size or run fewer workers per node, then resume"
            )
    if any(
        type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("ray") for e in walk_exceptions(exc)
    ):
        return (
            f"out of memory: Ray's memory monitor killed a training worker (this machine has {memory_limit()}); "
            "lower train.batch_size or run fewer workers per node, then resume"
        )
    for text in texts:
        if NODE_LOST.search(text):
            return (
                f"lost {_node(text)}: the cluster lost a node a training worker ran on; resume once the cluster has "
                "the workers' resources again"
            )
    died = process_death(exc)
    if died:
        return f"{died}; lower train.batch_size if memory ran out, then resume"
    return f"training failed: {first_line(innermost(exc))}"


def write_details(exc: BaseException, run_name: str) -> str | None:
    """The full traceback of ``exc`` in a file of the temporary folder (a full disk for the
    run's storage leaves it room); its path, or None if it could not be written."""
    path = Path(tempfile.gettempdir()) / f"raydrat-crash-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    try:
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return str(path)


@contextlib.contextmanager
def secondary(what: str) -> Iterator[None]:
    """A failure inside is one warning line, never raised: for clean-up on a path that has an
    error (or a result) of its own, which must be the one the user sees."""
    try:
        yield
    except Exception as exc:
        log.warning(f"warning: {what} failed: {first_line(innermost(exc))}")
