"""Checkpoints through Ray Train: reporting them, and finding the one a worker group starts
from. The files themselves are :mod:`raydrat.core.state`'s."""

from __future__ import annotations

from pathlib import Path

import ray.train
import ray.util

from raydrat.core import state as S
from raydrat.core.fit import Callback, FitState
from raydrat.ray_train.resume import latest_checkpoint


class RayReport(Callback):
    """At every save step, every rank writes its part of the checkpoint and reports it with
    the metrics (``ray.train.report`` is a barrier all ranks reach)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        where = {"node_ip": ray.util.get_node_ip_address()}  # the node this rank ran on
        with S.temporary_checkpoint(state.model, state.optimizer, state.step, self.config, state.techniques,
                                    state.position, state.rank, rank_extra=where) as d:
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def newest(restored: ray.train.Checkpoint | None, on_storage: Path | None) -> ray.train.Checkpoint | None:
    """The checkpoint to start from: Ray Train's restored one or the newest checkpoint
    directory found on storage, whichever was saved later. Both live in the run's storage
    directory, named ``checkpoint_<timestamp>``, so the later name is the later save."""
    if on_storage is None:
        return restored
    if restored is None or Path(restored.path).name < on_storage.name:
        return ray.train.Checkpoint(str(on_storage))
    return restored


def restore_latest(state: FitState, run_dir: str | None, since: float) -> bool | None:
    """Start ``state`` from the newest of Ray Train's restored checkpoint and the run's
    checkpoints on storage saved since ``since`` (Ray Train records a save only once its
    controller has collected every worker's report, so a worker killed right after saving
    can leave the newest save out of its record). Returns ``None`` when there was none,
    else whether this rank's own state was in it."""
    on_storage = latest_checkpoint(Path(run_dir), since, state.world_size) if run_dir else None
    restored = newest(ray.train.get_checkpoint(), on_storage)
    if restored is None:
        return None
    with restored.as_directory() as d:
        rank_state = S.load_rank_state(d, state.rank)
        saved = S.load_state(d)
        state.start_step = S.restore(state.model, state.optimizer, saved, rank_state, state.techniques,
                                     state.position)
    state.restored = True
    return rank_state is not None
