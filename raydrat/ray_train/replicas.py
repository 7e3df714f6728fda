"""Ray Train's side of ``sync.engine: torchft``: each Train worker is a torchft replica group.

* :func:`torch_config`: the ``TorchftConfig`` that runs the torchft Lighthouse as a Ray
  actor, gives every worker its own process group, and lets Ray Train replace a failing
  worker alone while the others go on (refused in one line when torchft is not installed);
* :func:`join_replicas`: in a worker, after its checkpoint is restored and before its first
  step, connect the worker's ``Manager`` and take part in one sync
  (:meth:`~raydrat.core.techniques.sync.torchft_local.TorchftStrategy.join`); a replacement
  comes out of it with a live peer's weights, optimizer states, step and data position;
* :class:`ReplicaLog`: a replacement's rejoin into the MLflow run, and the ``Manager``
  closed at the end;
* the Lighthouse's death (:mod:`raydrat.ray_train.lighthouse`): each replica watches it from
  its join to its end; a dead one is replaced when Ray Train restarts the groups.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray.train
import ray.util
import torch

from raydrat.config import ConfigError, RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.data.handover import StreamTable, check_one_reader
from raydrat.core.data.stream import TrainSource
from raydrat.core.fit import Callback, FitState
from raydrat.core.techniques.sync.torchft_local import TORCHFT_MISSING, TorchftStrategy, torchft_available
from raydrat.ray_train import lighthouse
from raydrat.ray_train.lighthouse import LighthouseWatch
from raydrat.tracking import Run

LIGHTHOUSE = {"min_replicas": 1, "join_timeout_ms": 5000, "heartbeat_timeout_ms": 5000}
"""The Lighthouse's quorum rules: one live replica is a quorum (the survivors of a death go
on); a replica that is heartbeating but not yet in the quorum is waited for up to 5 s; one
silent for 5 s is dead."""


def check_engine(cfg: RaydratConfig) -> None:
    """Refuse ``sync.engine: torchft`` without torchft installed, in one line naming the extra
    (before Ray starts)."""
    if cfg.sync.engine == "torchft" and not torchft_available():
        raise ConfigError(TORCHFT_MISSING)


def torch_config(cfg: RaydratConfig, use_gpu: bool) -> ray.train.torch.TorchConfig | None:
    """``TorchftConfig`` for ``sync.engine: torchft``, else ``None`` (Ray Train's default)."""
    if cfg.sync.engine != "torchft":
        return None
    check_engine(cfg)
    return lighthouse.torch_config(LIGHTHOUSE, backend="nccl" if use_gpu else "gloo")


def replica_datasets(cfg: RaydratConfig, datasets: dict) -> dict:
    """``{"val_dataset": ...}`` for the worker's loop config under ``sync.engine: torchft``
    (empty otherwise): Ray Train 2.60 cannot hand a replaced replica group its share of the
    trainer's datasets (``get_dataset_shard`` fails with an ``IndexError`` in the replacement),
    so every worker iterates the val dataset itself."""
    return {"val_dataset": datasets["val"]} if cfg.sync.engine == "torchft" and "val" in datasets else {}


FINISHED_FILE = "replicas-finished"
"""Written into the run's directory by a replica whose loop ended: a replacement that starts
after that has no one to join and nothing left to train."""


def quiet_torchft() -> None:
    """torchft's own logs at warnings only in this worker: its Python loggers, and its Rust
    core's (``RUST_LOG``, read when the ``Manager`` starts), which otherwise print every
    quorum and commit."""
    os.environ.setdefault("RUST_LOG", "warn")
    for name in ("torchft", "torchft_quorums", "torchft_commits"):
        logging.getLogger(name).setLevel(logging.WARNING)


def finished(run_dir: str) -> bool:
    return (Path(run_dir) / FINISHED_FILE).exists()


def join_replicas(
    state: FitState, rank: int, device: torch.device, source: TrainSource, run_dir: str
) -> LighthouseWatch | None:
    """Connect this worker's replica group and join the others (see the module docstring);
    a worker that was behind starts from the step it took on, and reads the part of the
    training order (``source``) of the worker it replaces from the cursors the replicas last
    agreed on (:mod:`raydrat.core.data.handover`). A replacement that arrives once the
    others have finished (``run_dir`` says so) trains nothing. Nothing for other engines.
    Returns the :class:`~raydrat.ray_train.lighthouse.LighthouseWatch` started before the
    join (for :class:`ReplicaLog` to stop), or ``None``."""
    sync = state.techniques.sync
    if not isinstance(sync, TorchftStrategy):
        return None
    if finished(run_dir):
        state.start_step = state.train.steps
        return None
    watch = LighthouseWatch(run_dir).start()
    quiet_torchft()
    world = state.world_size
    check_one_reader(source.stream_count, world)
    table = StreamTable(source.stream_count)
    position = state.position

    def take_over(shared: dict) -> None:
        table.load(shared["table"])
        table.hand_over(position, rank, world, int(shared["blocks"]))

    sync.share_state("data", take_over, lambda: {"table": table.state(), "blocks": position.blocks})
    sync.agree_on(lambda: table.encode(position, rank, world), table.record)
    sync.connect(rank, device=device, host=ray.util.get_node_ip_address())  # other nodes may not resolve our name
    if sync.join():
        state.start_step = sync.done
        M.setup_logging().info(f"replica {rank} joined the others at step {sync.done} (healed from a live peer)")
    if finished(run_dir):  # the others ended while this one waited in its first quorum
        state.start_step = state.train.steps
    return watch


def may_report(state: FitState) -> bool:
    """Whether this worker may call ``ray.train.report`` (a barrier over every worker) at this
    step: always, but under ``sync.engine: torchft`` only when every replica took part in the
    step's sync (the save steps are sync steps). A missing replica, or one that joined at this
    step, would never reach the barrier: the others would wait there for it while it waits
    for them in its first quorum. That save is skipped (the next one is taken)."""
    sync = state.techniques.sync
    if not isinstance(sync, TorchftStrategy) or sync.all_present():
        return True
    M.setup_logging().info(
        f"step {state.step}: {sync.quorum_size} of {sync.world_size} replicas in the last sync: no checkpoint this time"
    )
    return False


class ReplicaLog(Callback):
    """A replica that healed from a peer logs the step it took on (``replicas/healed_at_step``,
    the rejoin event; the others log the quorum's size and who left or joined it with their
    sync metrics); every replica leaves the quorum when its loop ends, and says so in
    ``run_dir`` (:data:`FINISHED_FILE`), and stops watching the Lighthouse (``watch``)."""

    def __init__(self, run: Run, run_dir: str, watch: LighthouseWatch | None = None):
        self.run, self.run_dir, self.watch = run, run_dir, watch

    def on_fit_start(self, state: FitState) -> None:
        sync = state.techniques.sync
        if isinstance(sync, TorchftStrategy) and sync.healed_at is not None and self.run:
            self.run.log_metrics({M.HEALED_AT_STEP: float(sync.healed_at)}, sync.healed_at)

    def on_fit_end(self, state: FitState) -> None:
        if self.watch is not None:
            self.watch.stop()
        sync = state.techniques.sync
        if isinstance(sync, TorchftStrategy):
            if state.step >= state.train.steps:
                path = Path(self.run_dir)
                path.mkdir(parents=True, exist_ok=True)
                (path / FINISHED_FILE).write_text(f"{state.step}\n")
            sync.close()
