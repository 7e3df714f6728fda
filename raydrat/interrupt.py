"""Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) during ``raydrat train``: stop
cleanly, say how to resume. (A SIGHUP ignored when the run started, as under ``nohup``, stays
ignored; a SIGKILL cannot be caught: the next ``--resume`` says the last driver died.)

Ray installs its own handlers: ``ray.init`` makes SIGTERM ``sys.exit`` (which escapes Ray's
C++ wait loops as a crash, exit 134), and Ray Train's ``fit`` makes SIGINT abort the run
and exit 1 with its own message. :func:`call_interruptibly` runs the blocking call in a
second thread (Ray Train installs no handler off the main thread, as under Tune) while the
main thread waits with raydrat's handlers installed: a signal raises :class:`Interrupted`
in the main thread, where the caller ends the MLflow run as KILLED, stops Ray, leaves only
complete checkpoints, and the CLI prints the resume command and exits ``128 + signal``
(130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). Only the standard library is used here.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``. A ``KeyboardInterrupt`` (so no ``except
    Exception`` swallows it); ``run_name`` and ``resumable`` are set by the trainer."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_name: str | None = None
        self.resumable = False

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name


_received: list[int] = []


def received() -> int | None:
    """The first signal received inside :func:`trapped` (``None``: none)."""
    return _received[0] if _received else None


def as_interrupted(exc: BaseException) -> Interrupted:
    """``exc`` (an :class:`Interrupted`, or a plain ``KeyboardInterrupt`` that Ray raised in
    its place) as an :class:`Interrupted` carrying the signal that was received."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(received() or signal.SIGINT)


@contextmanager
def trapped() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread while inside
    (the previous handlers come back on exit). Off the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        first = not _received
        _received.append(signum)
        if first:  # a second signal while stopping does not interrupt the clean-up
            raise Interrupted(signum)

    _received.clear()
    caught = [s for s in SIGNALS if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN]  # nohup's stays
    previous = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def call_interruptibly(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a second thread while the main thread waits, so that a
    signal reaches raydrat's handler (see :func:`trapped`) whatever ``fn`` installs. The
    result or exception of ``fn`` is the caller's; an interrupt raises :class:`Interrupted`
    at once (that thread is a daemon and dies with the process or with Ray)."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="raydrat-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]
