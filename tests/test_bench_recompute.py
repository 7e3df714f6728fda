"""``raydrat bench recompute`` (eager rows, debug model): every row trains through the fit
loop, carries every documented JSON field, and its allocator-measured bytes say what the plan
promised (raydrat full = torch's checkpoint per block, budgets kept)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from raydrat.bench.compile_time import CompileClock
from raydrat.bench.recompute import run_model, run_recompute
from raydrat.config import ConfigError

FIELDS = {"model", "planner", "mode", "budget_fraction", "compiled", "saved_bytes", "peak_bytes", "time_ratio"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_eager_rows_measure_what_each_plan_promises():
    rows = {r["variant"]: r for r in run_model("debug", [0.5], steps=1, compiled=False, log=lambda *_: None)}
    assert {"none", "checkpoint/block", "full", "budget0.5", "gated0.5"} <= set(rows)
    for r in rows.values():
        assert FIELDS <= set(r) and r["model"] == "debug" and r["compiled"] is False
    none = rows["none"]
    assert none["time_ratio"] == 1.0 and none["budget_fraction"] is None
    assert rows["full"]["saved_bytes"] == rows["checkpoint/block"]["saved_bytes"] < none["saved_bytes"]
    for name in ("budget0.5", "gated0.5"):
        r = rows[name]
        assert r["planner"] == "raydrat" and r["budget_fraction"] == 0.5
        assert r["saved_bytes"] <= r["budget_bytes"] < none["saved_bytes"]
    assert rows["budget0.5"]["plan"] == "measured" and rows["budget0.5"]["plan_cpu_s"] > 0  # the cache is off
    assert rows["full"]["plan"] is None
    for r in rows.values():
        lo, hi = r["cpu_step_range_s"]
        assert 0 < lo <= r["cpu_step_s"] <= hi and r["compile_cpu_s"] >= 0 and r["inductor_cache"] == "-"
        lo, hi = r["cpu_time_ratio_range"]
        assert lo <= r["cpu_time_ratio"] <= hi


def test_compile_clock_counts_the_processes_the_block_starts():
    """Inductor compiles in worker processes and the C++ compiler: their CPU time counts."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass"
    with CompileClock() as clock:
        subprocess.run([sys.executable, "-c", burn], check=True)
    assert clock.time.cpu_s >= 0.5 and clock.time.wall_s >= 0.5 and clock.time.cache == "-"


def test_bad_fractions_are_refused():
    with pytest.raises(ConfigError, match=r"--fractions \[1\.5\]"):
        run_recompute(models=["debug"], fractions=[1.5], steps=1, compiled=False)
