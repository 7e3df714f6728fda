"""A training run's measuring window: wall and CPU seconds from the end of one step to the
end of the last, read inside the process that trains (a Ray Train worker, or this one).

:class:`Window` is a :class:`~raydrat.core.fit.Callback`: at the end of step ``start`` it
reads the clocks, at the end of the run's last step it reads them again, so everything the
loop does in between counts (the steps, waiting for data, logging, evaluations,
checkpoints and their reports), and what came before (building the model, starting the
data stream, the first steps' warm-up) does not. A Ray Train worker hands its figures to a
:class:`WindowSink` actor, which the driver reads once the run is over."""

from __future__ import annotations

import time

import ray

from raydrat.core import metrics as M
from raydrat.core.fit import Callback, FitState


class Window(Callback):
    """Rank 0's window from the end of step ``start`` to the end of the last step: ``figures``
    holds ``steps`` (timed), ``wall_s``, ``cpu_s`` (this process's CPU time, all its threads),
    ``other_threads_cpu_s`` (the part of it not spent by the loop's own thread: a data
    stream's reader, a tracking writer, Ray's threads),
    ``data_wait_s`` (waiting for data within the window), ``data_wait_before_s`` (before it)
    and ``before_s`` (from the loop's start to the window's). ``sink``: a :class:`WindowSink`
    handle that gets ``figures`` under ``key`` (a run in another process)."""

    def __init__(self, start: int, sink=None, key: str = ""):
        self.start, self.sink, self.key = start, sink, key
        self.figures: dict[str, float] = {}
        self._at: tuple[float, float, float, float] | None = None

    def on_step_end(self, state: FitState) -> None:
        if state.rank != 0:
            return
        now, cpu, wait = time.perf_counter(), time.process_time(), state.clock.totals[M.DATA_WAIT_S]
        loop_cpu = time.thread_time()
        if state.step == self.start:
            self._at = (now, cpu, wait, loop_cpu)
            self.figures = {"data_wait_before_s": wait, "before_s": now - state.clock.started}
        if state.step == state.train.steps and self._at is not None:
            t0, c0, w0, l0 = self._at
            self.figures.update(
                steps=state.step - self.start,
                tokens=(state.step - self.start) * state.tokens_per_step,
                wall_s=now - t0,
                cpu_s=cpu - c0,
                # the two clocks are read a moment apart: a difference below zero is their jitter
                other_threads_cpu_s=max(0.0, (cpu - c0) - (loop_cpu - l0)),
                data_wait_s=wait - w0,
            )
            if self.sink is not None:
                ray.get(self.sink.put.remote(self.key, self.figures))


@ray.remote(num_cpus=0)
class WindowSink:
    """Where Ray Train workers leave their :class:`Window` figures for the driver."""

    def __init__(self):
        self.figures: dict[str, dict] = {}

    def put(self, key: str, figures: dict) -> None:
        self.figures[key] = figures

    def get(self, key: str) -> dict | None:
        return self.figures.get(key)
