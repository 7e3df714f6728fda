"""What ``raydrat train`` prints: raydrat's own lines, not Ray's.

By default (:func:`quiet_console` with ``verbose=False``) the driver prints, of what the Ray
workers write, only raydrat's log lines (``[raydrat] ...``: one line per worker event, with
Ray's ``(RayTrainWorker pid=N)`` prefix), and the autoscaler's warnings and errors. Ray
Train's per-report ``Reporting training result N: TrainingReport(...)`` lines, Ray Data's
notices, raylet task retries and native-library chatter stay in Ray's log files
(``/tmp/ray/session_latest/logs``). Ray's own driver-side warnings are raised to errors
only. ``--verbose`` prints everything, as Ray does.

Whatever the mode, and for every raydrat command that starts Ray, Ray's ANSI colour codes
are left out when stdout or stderr is not a terminal (``RAY_COLOR_PREFIX=0``, unless the user
set it).

Ray prints worker output from a handler on its log dispatcher (``ray_print_logs``,
registered by ``ray.init``) and prints the raylet's error events through
``print_to_stdstream``; :func:`install` swaps both for filtering ones after Ray starts
(:func:`raydrat.ray_session.ensure_ray` calls it). Both are Ray internals: if they are
missing, the console is left as Ray makes it (``tests/test_cli.py`` checks them on a real
instance).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import ray._private.worker as ray_worker  # Ray internal (the log dispatcher): used only here

RAYDRAT_MARK = "[raydrat]"
RAYLET_NOISE = ("will be retried", "worker processes have been started on node")
"""The raylet's events no user acts on: a task retry Ray makes by itself, and its notice that
it started more worker processes than it expected (a sweep's trials each start several)."""
RAY_HANDLER = "ray_print_logs"
_quiet = False


def keep_line(data: dict, line: str) -> bool:
    """Whether a quiet console prints ``line`` of a worker's output batch ``data``: raydrat's
    own lines, the autoscaler's warnings and errors, and the raylet's error events (a worker
    killed, out of memory) except :data:`RAYLET_NOISE`."""
    if data.get("pid") == "autoscaler":
        return "Error" in line or "Warning" in line
    if data.get("pid") == "raylet":
        return not any(noise in line for noise in RAYLET_NOISE)
    return RAYDRAT_MARK in line


def kept_lines(data: dict) -> list[str]:
    """The lines of ``data`` a quiet console prints, each event on one line (a raylet event's
    first line: the rest is in Ray's logs)."""
    lines = [ln for ln in data.get("lines", []) if keep_line(data, ln)]
    if data.get("pid") == "raylet":
        lines = [ln.strip().splitlines()[0] for ln in lines if ln.strip()]
    return lines


def plain_when_piped() -> None:
    """No ANSI colour codes in Ray's worker prefixes when the output is not a terminal."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextlib.contextmanager
def quiet_console(verbose: bool = False) -> Iterator[None]:
    """Inside, a Ray instance started (or joined) by raydrat prints only raydrat's lines
    (``verbose``: everything Ray prints)."""
    global _quiet
    saved = _quiet
    _quiet = not verbose
    plain_when_piped()
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore", module=r"ray\.")
            yield
    finally:
        _quiet = saved


QUIET_RAY_LOGGERS = ("ray._private.authentication",)
"""Ray's loggers whose warnings no user can act on: the token-authentication notice a new
local instance prints (token authentication is on by default)."""


def quiet_ray_start() -> None:
    """Before ``ray.init``: in a quiet console the warnings of :data:`QUIET_RAY_LOGGERS` stay out
    (``--verbose``: they are printed)."""
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if _quiet else logging.NOTSET)


def ray_log_level() -> int:
    """The level ``ray.init`` gives Ray's driver-side loggers."""
    return logging.ERROR if _quiet else logging.WARNING


def install() -> bool:
    """After ``ray.init``: in a quiet console, print only the worker lines :func:`keep_line`
    keeps (the raylet's events too when the workers' output is not forwarded at all,
    ``log_to_driver=False``, as in a sweep). Returns whether the filter is in place."""
    if not _quiet:
        return False
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if dispatcher is None or printer is None:
        return False
    printer = getattr(printer, "__wrapped__", printer)  # installed before: wrap Ray's own again
    kept = functools.wraps(printer)(functools.partial(_print_kept, printer))
    if any(n == RAY_HANDLER for n, _ in dispatcher.handlers):  # the workers' output is forwarded
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.remove_handler(RAY_HANDLER)
        dispatcher.add_handler(RAY_HANDLER, functools.partial(kept, ignore_prefix=ignore_prefix))
    ray_worker.print_to_stdstream = kept  # the raylet's error events are printed through it
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def _print_kept(printer, data: dict, ignore_prefix: bool) -> None:
    lines = kept_lines(data)
    if lines:
        printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)
