"""How long a block takes to compile: wall clock, CPU time of this process and every process
it started (inductor compiles its kernels in worker processes, with the C++ compiler in
more), and whether inductor's on-disk FX graph cache served it.

CPU time is what a shared machine does not inflate; the cache counts say which of the two
very different figures a row is: a compile from scratch (minutes on a small CPU: the C++
kernels), or one served from ``torch._inductor``'s caches (seconds: tracing and
partitioning only)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
from torch._dynamo.utils import counters


def tree_cpu_s() -> float:
    """CPU seconds of this process and its descendants so far (live ones, and those reaped)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, and of the children it reaped
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:4])
        except psutil.Error:  # it ended meanwhile
            pass
    return total


def _fx_cache() -> tuple[int, int]:
    inductor = counters["inductor"]
    return inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]


@dataclass
class CompileTime:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    """This process and its descendants."""
    fx_hits: int = 0
    fx_misses: int = 0
    """Graphs inductor's FX graph cache served, and those it compiled."""

    @property
    def cache(self) -> str:
        """``hit``, ``miss``, ``partial`` or ``-`` (nothing compiled)."""
        if not self.fx_hits + self.fx_misses:
            return "-"
        return "hit" if not self.fx_misses else "miss" if not self.fx_hits else "partial"


class CompileClock:
    """``with clock:`` adds the block's figures to :attr:`time`."""

    def __init__(self):
        self.time = CompileTime()

    def __enter__(self) -> CompileClock:
        self._start = (time.perf_counter(), tree_cpu_s(), *_fx_cache())
        return self

    def __exit__(self, *exc) -> None:
        wall, cpu, hits, misses = self._start
        now_hits, now_misses = _fx_cache()
        t = self.time
        t.wall_s += time.perf_counter() - wall
        t.cpu_s += tree_cpu_s() - cpu
        t.fx_hits += now_hits - hits
        t.fx_misses += now_misses - misses
