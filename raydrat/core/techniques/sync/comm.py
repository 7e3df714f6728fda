"""Communication accounting: the bytes this worker sends and the seconds it spends in
collectives, per optimizer step.

For every collective this worker launches we record

* bytes: what this worker sends. A ring all-reduce of an ``N``-byte buffer over ``W``
  workers sends ``2 (W - 1) / W * N`` from each (reduce-scatter, then all-gather): with 2
  workers exactly ``N``. The quantized exchange (:mod:`.codec`) is a reduce-scatter (an
  all-to-all of the quantized chunks: ``(W - 1) / W`` of the payload leaves this worker)
  and an all-gather of this worker's re-quantized chunk (sent to ``W - 1`` peers): the same
  ``2 (W - 1) / W`` of the quantized payload, scales and padding included.
* seconds: wall time from launching the collective to its completion (the union of the
  intervals when several are in flight, so overlapping DDP buckets are not double counted;
  DDP's all-reduce overlaps the backward pass and the delayed exchange overlaps the next
  steps, so this is time *in* collectives, not time *lost* to them).

:attr:`CommStats.latency_s` delays each collective's launch (a simulated slow link, set by
``raydrat bench sync --latency-ms``; not a run setting); the delay counts as time in the
collective.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch
import torch.distributed as dist

from raydrat.core import metrics as M


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes each worker sends in a ring all-reduce of ``payload_bytes``."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * payload_bytes))


class CommStats:
    """Bytes sent and seconds spent in collectives since the last :meth:`take` (thread-safe:
    a delayed exchange reports from its background thread).

    ``flush_bytes`` are those of the syncs outside the schedule (before an evaluation or a
    checkpoint); ``launch_bytes`` maps each step that launched scheduled syncs to their bytes."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.latency_s = 0.0
        """Seconds each collective waits before it starts (a simulated slow link; benchmarks
        set it after building the strategy)."""
        self._lock = threading.Lock()
        self._bytes = 0
        self._intervals: list[tuple[float, float]] = []
        self.total_bytes = 0
        self.flush_bytes = 0
        self.launch_bytes: dict[int, int] = {}
        self.total_s = 0.0
        self.calls = 0

    def launch(self) -> float:
        """Start a collective: the time it starts, after the simulated link's wait (which
        therefore counts as communication time)."""
        start = time.perf_counter()
        if self.latency_s:
            time.sleep(self.latency_s)
        return start

    def add(self, payload_bytes: int, start: float, end: float) -> None:
        """One all-reduce of ``payload_bytes`` (counted as a ring sends it)."""
        self.add_sent(ring_allreduce_bytes(payload_bytes, self.world_size), start, end)

    def add_sent(self, sent_bytes: int, start: float, end: float, step: int | None = None, flush: bool = False) -> None:
        """``sent_bytes`` that left this worker between ``start`` and ``end``; ``step``: the
        step that launched this scheduled sync; ``flush``: a sync outside the schedule."""
        with self._lock:
            self._bytes += sent_bytes
            self.total_bytes += sent_bytes
            if flush:
                self.flush_bytes += sent_bytes
            if step is not None:
                self.launch_bytes[step] = self.launch_bytes.get(step, 0) + sent_bytes
            self.calls += 1
            self._intervals.append((start, end))

    def take(self) -> tuple[int, float]:
        """``(bytes, seconds)`` since the previous call; resets the window."""
        with self._lock:
            seconds = _union_length(self._intervals)
            self.total_s += seconds
            out = (self._bytes, seconds)
            self._bytes, self._intervals = 0, []
        return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class CommMeter:
    """Per-step communication figures over a logging window (rank 0 logs them)."""

    def __init__(self, comm: CommStats):
        self.comm = comm
        self._steps = 0
        self._bytes = 0
        self._comm_s = 0.0
        self._step_s = 0.0

    def step_done(self, step_s: float) -> None:
        b, s = self.comm.take()
        self._steps += 1
        self._bytes += b
        self._comm_s += s
        self._step_s += step_s

    def window(self) -> dict[str, float]:
        """Mean MiB and seconds per step and the comm share of step time; resets."""
        n = max(1, self._steps)
        out = {
            M.COMM_MIB_PER_STEP: self._bytes / n / M.MIB,
            M.COMM_S_PER_STEP: self._comm_s / n,
            M.COMM_FRACTION: self._comm_s / self._step_s if self._step_s > 0 else 0.0,
            M.COMM_MIB_TOTAL: self.comm.total_bytes / M.MIB,
        }
        self._steps, self._bytes, self._comm_s, self._step_s = 0, 0, 0.0, 0.0
        return out


def flat_allreduce_mean(
    tensors: list[torch.Tensor], comm: CommStats, step: int | None = None, flush: bool = False
) -> None:
    """Average ``tensors`` in place across workers: one flat buffer (one all-reduce) per
    (device, dtype), not one call per tensor (``step``, ``flush``: see :meth:`CommStats.add_sent`)."""
    world = dist.get_world_size()
    groups: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        start = comm.launch()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        comm.add_sent(
            ring_allreduce_bytes(flat.numel() * flat.element_size(), world),
            start,
            time.perf_counter(),
            step=step,
            flush=flush,
        )
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n
