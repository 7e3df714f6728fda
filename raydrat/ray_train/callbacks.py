"""The worker's MLflow callback: rank 0 (under torchft, the first live replica) records the run's metrics (and, for gated runs, the
gates' heat-map) through a :class:`~raydrat.tracking.Run`, which does nothing when tracking
is off.

At every logging step it records that step's figures; at every checkpoint, the report's own
figures too (the allocator's peak memory, steady tokens/s, where the time went, and the
micro-batch when ``train.auto_microbatch`` may change it), the same values
``ray.train.report`` sends: so a run's last metrics are its last report, and a sweep's
report reads them from here. Each batch goes out as :func:`raydrat.core.metrics.for_tracking`
lays it out (the losses first, system figures rounded)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from raydrat.core import metrics as M
from raydrat.core.fit import Callback, FitState, saves_at
from raydrat.core.techniques.recompute.planners import GatedRecompute
from raydrat.plots import gate_heatmap
from raydrat.tracking import Run

REPORT_FIGURES = (M.PEAK_MIB, M.TOKENS_PER_S_AVG, M.TRAIN_TIME_S, M.LOOP_S, *M.PHASES)
"""What a checkpoint's report adds to the logging step's metrics."""


class RunMetrics(Callback):
    """The worker group's metrics into ``run`` from the worker that logs for the group (rank 0;
    under torchft the first replica of the last quorum), while the run is open: a sweep's driver closes the run
    of a trial its scheduler stopped, and the trial's workers, killed a moment later, log
    nothing into it after their next checkpoint (the trial's figures are what it logged
    while it lived).

    Whether the run is still open is read from the store where it matters, once per step
    at most: at every checkpoint step, before that step's metrics (a scheduler decides at
    the reports checkpoints make), and at the end; not at every log step. A store that
    cannot say (unreachable) leaves the run open. No call waits on the store: the run's
    writer delivers from its own thread, and at the end gets a short while to deliver what
    is pending (what it cannot stays in the run's backlog).

    The run page lists a run's metrics in the order they were first logged: in a run that
    starts from scratch, the model figures other than the losses wait (with their steps)
    until the first ``val_loss`` is logged, so the list begins with ``train_loss`` and
    ``val_loss``. ``train_loss`` and the system figures (listed apart, drawn over time) are
    logged at once. Under torchft nothing waits: the worker that logs may die, and what
    waited in it would be a gap in the run's history."""

    def __init__(self, run: Run):
        self.run = run
        self._given = run
        self._checked_at: int | None = None
        self._logged = False
        """Whether this worker recorded anything (its writer has records to deliver at the end)."""
        self._held: list[tuple[dict[str, float], int]] | None = None
        """A new run's figures that wait for its first ``val_loss``; ``None``: none wait."""

    def _open(self, state: FitState, check: bool = True) -> bool:
        if not self.run or not state.techniques.sync.logs_for_the_group(state.rank):
            return False
        self._logged = True
        if check and self._checked_at != state.step:
            self._checked_at = state.step
            if self.run.status() not in ("RUNNING", None):
                self.run = Run.off()
        return bool(self.run)

    def on_fit_start(self, state: FitState) -> None:
        if not self._open(state, check=False):
            return
        # The store's client is made on its first read (for SQLite, about a second of CPU):
        # made here, beside the data stream's start-up, not inside the first checkpoint step.
        threading.Thread(target=self.run.connect, name="raydrat-tracking-client", daemon=True).start()
        if state.restored and self._open(state):
            self.run.log_metrics({M.RESUMED_FROM_STEP: state.start_step}, state.start_step)
        elif not state.restored and not state.techniques.sync.hands_over_logging:
            self._held = []

    def _log(self, values: dict[str, float], step: int) -> None:
        values = M.for_tracking(values)
        if self._held is None:
            self.run.log_metrics(values, step)
            return
        now = {k: v for k, v in values.items() if k in M.LEADING or k.startswith(M.SYSTEM)}
        if now:
            self.run.log_metrics(now, step)
        rest = {k: v for k, v in values.items() if k not in now}
        if rest:
            self._held.append((rest, step))
        if M.VAL_LOSS in now:
            self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for figures, step in held:
            self.run.log_metrics(figures, step)

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        if self._open(state, check=saves_at(state.train, state.step)):
            self._log(values, state.step)

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        if not self._open(state):
            return
        keys = [*REPORT_FIGURES, *([M.MICRO_BATCH] if state.train.auto_microbatch else [])]
        figures = {k: report[k] for k in keys if k in report}
        if not figures.get(M.PEAK_MIB):  # nothing measured (no allocator on this device)
            figures.pop(M.PEAK_MIB, None)
        self._log(figures, state.step)

    def on_fit_end(self, state: FitState) -> None:
        if self._open(state, check=False):
            self._release_held()  # a loop that never evaluated (the last step always does)
        planner = state.techniques.recompute
        if isinstance(planner, GatedRecompute) and self._open(state):
            with tempfile.TemporaryDirectory() as tmp:
                png = gate_heatmap(planner.history, planner.branches, Path(tmp) / Path(M.GATE_HEATMAP_ARTIFACT).name)
                if png is not None:
                    self.run.log_artifact(png, str(Path(M.GATE_HEATMAP_ARTIFACT).parent))
        if self._logged:
            self._given.close()
