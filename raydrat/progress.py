"""Progress of a command's work (``raydrat eval``, ``raydrat generate``), on stderr: nothing
while the work is short, then one line every :data:`EVERY_S` seconds with how far it is and
its rate, and a last line with the totals when it ends. Whole lines, never redrawn: a log
file reads them as a terminal does.

``eval: 40/200 batches, 3.1 batches/s, 6,350 tokens/s, about 52s left``
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

EVERY_S = 5.0
"""Seconds between two lines (and before the first: work shorter than this prints none)."""


class Progress:
    """``update(done)`` as the work goes (``done`` of ``total`` ``unit``, each worth
    ``tokens_per_unit`` tokens when that is not 0); ``finish()`` once it ends."""

    def __init__(
        self,
        what: str,
        unit: str,
        total: int | None = None,
        tokens_per_unit: int = 0,
        every_s: float | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.unit, self.total, self.tokens_per_unit = what, unit, total, tokens_per_unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.out, self.clock = out, clock
        self.started = self.last = clock()
        self.done = 0
        self.lines = 0

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._say(self._line(now))

    def finish(self) -> None:
        """The totals, when a line was printed (short work stays quiet)."""
        if self.lines:
            now = self.clock()
            self._say(f"{self.what}: {self.done:,} {self.unit} in {now - self.started:.1f}s, {self._rates(now)}")

    def _rates(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        text = f"{rate:,.1f} {self.unit}/s"
        if self.tokens_per_unit:
            text += f", {rate * self.tokens_per_unit:,.0f} tokens/s"
        return text

    def _line(self, now: float) -> str:
        of = f"/{self.total:,}" if self.total else ""
        line = f"{self.what}: {self.done:,}{of} {self.unit}, {self._rates(now)}"
        if self.total and self.done:
            left = (self.total - self.done) * (now - self.started) / self.done
            line += f", about {left:.0f}s left"
        return line

    def _say(self, line: str) -> None:
        out = self.out or sys.stderr  # whatever stderr is now (a test's capture, a redirect)
        out.write(line + "\n")
        out.flush()
        self.lines += 1
