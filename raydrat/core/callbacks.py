"""Callbacks of :func:`raydrat.core.fit.fit` that need nothing but torch and the console:
the progress line, and checkpoints written to a local directory."""

from __future__ import annotations

import logging
from pathlib import Path

from raydrat.core import metrics as M
from raydrat.core.checkpoint.state import save_checkpoint
from raydrat.core.fit import Callback, FitState


class ConsoleLog(Callback):
    """Rank 0 prints one progress line per logging step (and says where a resumed run starts)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or M.setup_logging()

    def on_fit_start(self, state: FitState) -> None:
        if state.rank == 0 and state.restored:
            self.log.info(f"resumed at step {state.start_step}")

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        if state.rank == 0:
            eta = state.throughput.eta_s(state.step - state.start_step)
            self.log.info(M.progress_line(state.step, state.train.steps, values, eta))


class LocalCheckpoint(Callback):
    """At every save step, write ``directory/checkpoint_<step>`` (``config``: saved beside
    the weights, e.g. ``cfg.to_dict()``)."""

    def __init__(self, directory: str | Path, config: dict | None = None):
        self.directory = Path(directory)
        self.config = config or {}
        self.saved: list[Path] = []

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        d = self.directory / f"checkpoint_{state.step:06d}"
        save_checkpoint(
            d,
            state.model,
            state.optimizer,
            state.step,
            self.config,
            state.techniques,
            state.position,
            state.rank,
            state.world_size,
        )
        self.saved.append(d)
