"""Checkpoints through Ray Train: reporting them, and finding the one a worker group starts
from. The files themselves, their manifests and the completeness check are
:mod:`raydrat.core.checkpoint.state`'s."""

from __future__ import annotations

from pathlib import Path

import ray.train
import ray.util

from raydrat.core import metrics as M
from raydrat.core.checkpoint import state as S
from raydrat.core.fit import Callback, FitState
from raydrat.ray_train.resume import choose_checkpoint, describe_choice


class RayReport(Callback):
    """At every save step, every rank writes its part of the checkpoint (its manifest last)
    and reports it with the metrics (``ray.train.report`` is a barrier all ranks reach). A
    save between evaluations has no validation loss: it is reported as the largest finite
    float (the worst score), not ``inf``, which Ray Train's run snapshot stores as JSON and
    reads back as ``None`` (its checkpoint manager then fails on resume)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        where = {"node_ip": ray.util.get_node_ip_address()}  # the node this rank ran on
        with S.temporary_checkpoint(
            state.model,
            state.optimizer,
            state.step,
            self.config,
            state.techniques,
            state.position,
            state.rank,
            state.world_size,
            rank_extra=where,
        ) as d:
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def restore_latest(state: FitState, run_dir: str | None, since: float) -> bool | None:
    """Start ``state`` from the newest *complete* checkpoint among Ray Train's restored one
    and the run's checkpoints on storage saved since ``since`` (Ray Train records a save
    only once its controller has collected every worker's report, so a worker killed right
    after saving can leave the newest save out of its record; a save cut off half-way, or a
    file truncated since, is skipped, and rank 0 says which one it took and why newer ones
    were skipped). Returns ``None`` when there was none, else whether this rank's own state
    was in it."""
    restored = ray.train.get_checkpoint()
    also = (restored.path,) if restored is not None else ()
    chosen, skipped = choose_checkpoint(Path(run_dir) if run_dir else None, since, also)
    if state.rank == 0 and (chosen is not None or skipped):
        start = "starting from checkpoint " if chosen is not None else "starting from step 0: "
        M.setup_logging().info(start + describe_choice(chosen, skipped))
    if chosen is None:
        return None
    d = str(chosen)
    rank_state = S.load_rank_state(d, state.rank)
    saved = S.load_state(d)
    state.start_step = S.restore(
        state.model, state.optimizer, saved, rank_state, state.techniques, state.position, directory=d
    )
    state.restored = True
    return rank_state is not None
