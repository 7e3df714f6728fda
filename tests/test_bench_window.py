"""The measuring window of ``bench overhead`` (:class:`raydrat.bench.window.Window`) on an
in-process run: it counts the steps after its start, and the time and data waits inside it,
not those before."""

from __future__ import annotations

import time

import pytest

from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.overhead import check_window
from raydrat.bench.window import Window
from raydrat.config import load_config
from raydrat.core.fit import Callback


class SlowData(Callback):
    """Sleeps inside the data wait of the steps before ``until`` (a stream starting up)."""

    def __init__(self, until: int, seconds: float):
        self.until, self.seconds = until, seconds

    def on_step_end(self, state) -> None:
        if state.step < self.until:
            with state.clock.timing("system/data_wait_s"):
                time.sleep(self.seconds)


def test_the_window_starts_after_its_step_and_ends_with_the_last():
    cfg = load_config("debug", ["train.steps=6", "train.eval_every=3", "train.log_every=3"])
    window = Window(start=2)
    run = LocalRun.start(cfg, LocalData.random(cfg, cfg.train.steps), [SlowData(until=2, seconds=0.2), window])
    t0 = time.perf_counter()
    run.run()
    total = time.perf_counter() - t0
    f = window.figures
    assert f["steps"] == 4 and f["tokens"] == 4 * cfg.train.batch_size * cfg.model.seq_len
    assert 0 < f["wall_s"] < total and 0 < f["cpu_s"]
    assert f["data_wait_before_s"] >= 0.2 and f["data_wait_s"] < 0.2  # the slow start is before the window
    assert f["before_s"] >= 0.2
    assert 0 <= f["other_threads_cpu_s"] < f["cpu_s"]  # the loop runs in this thread


@pytest.mark.parametrize("steps, start", [(10, 0), (10, 10), (5, 7)])
def test_a_window_outside_the_run_is_refused(steps, start):
    with pytest.raises(ValueError, match="--from-step"):
        check_window(steps, start)
