"""The worker's MLflow callback: rank 0 records the run's metrics (and, for gated runs, the
gates' heat-map) through a :class:`~raydrat.tracking.Run`, which does nothing when tracking
is off."""

from __future__ import annotations

import tempfile
from pathlib import Path

from raydrat.core import metrics as M
from raydrat.core.fit import Callback, FitState
from raydrat.core.techniques.recompute import GatedRecompute
from raydrat.plots import gate_heatmap
from raydrat.tracking import Run


class RunMetrics(Callback):
    def __init__(self, run: Run):
        self.run = run

    def on_fit_start(self, state: FitState) -> None:
        if state.rank == 0 and state.restored:
            self.run.log_metrics({M.RESUMED_FROM_STEP: state.start_step}, state.start_step)

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        if state.rank == 0:
            self.run.log_metrics(values, state.step)

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        """The worker's peak memory so far (allocator; and the malloc heap, apart)."""
        if state.rank == 0:
            self.run.log_metrics({k: report[k] for k in (M.PEAK_BYTES, M.HEAP_PEAK_BYTES) if report.get(k)}, state.step)

    def on_fit_end(self, state: FitState) -> None:
        planner = state.techniques.recompute
        if state.rank != 0 or not self.run or not isinstance(planner, GatedRecompute):
            return
        with tempfile.TemporaryDirectory() as tmp:
            png = gate_heatmap(planner.history, planner.branches, Path(tmp) / Path(M.GATE_HEATMAP_ARTIFACT).name)
            if png is not None:
                self.run.log_artifact(png, str(Path(M.GATE_HEATMAP_ARTIFACT).parent))
