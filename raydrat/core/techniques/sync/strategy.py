"""The sync strategy's step protocol, and plain training (one worker).

The training loop calls a strategy at these points::

    strategy = build_strategy(cfg.sync, world_size)   # raydrat.core.techniques.sync.build
    model = strategy.apply(model)                # DDP wrapper, fully_shard, or the bare model
    strategy.attach_optimizer(optimizer)         # local updates average its state
    with strategy.no_sync(): ...                 # every micro-batch but the last
    strategy.after_optimizer_step(done)          # local: sync what is due at step `done`
    strategy.step_done(step_s); strategy.metrics()  # bytes / seconds in collectives
    strategy.synchronize()                       # before an evaluation or a checkpoint
    strategy.state_dict() / load_state_dict()    # checkpointed under the name "sync"

The process group is the caller's (Ray Train's ``TorchConfig`` sets it up); the strategies
only use ``torch.distributed``. With one worker no strategy communicates: every mode is
plain training (this class).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.base import Technique
from raydrat.core.techniques.sync.comm import CommMeter, CommStats


class SyncStrategy(Technique):
    """Plain training (one worker), and the base of the others."""

    name = "sync"
    mode = "none"
    sharded = False
    """Whether checkpoints hold sharded model/optimizer state (FSDP: ``save_sharded``)."""
    hands_over_logging = False
    """Whether the worker that records the group's metrics may change during a run (then each
    one records at once what it has: none of it may wait in a worker that dies)."""

    def __init__(self, cfg: SyncConfig, world_size: int):
        self.cfg = cfg
        self.world_size = world_size
        self.comm = CommStats(world_size)
        self.meter = CommMeter(self.comm)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        return model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def no_sync(self) -> AbstractContextManager:
        """Context for micro-batches whose gradients must not be communicated yet."""
        return contextlib.nullcontext()

    def after_optimizer_step(self, done: int) -> bool:
        """Called after optimizer step number ``done`` (1-based); True if it synced."""
        return False

    def synchronize(self) -> bool:
        """Bring replicas into agreement now (before evaluating or checkpointing)."""
        return False

    def step_done(self, step_s: float) -> None:
        """Account this optimizer step's collectives (``step_s``: its wall time)."""
        self.meter.step_done(step_s)

    def metrics(self) -> dict[str, float]:
        """Communication per step over the window since the last call (with several workers)."""
        return self.meter.window() if self.world_size > 1 else {}

    def logs_for_the_group(self, rank: int) -> bool:
        """Whether worker ``rank`` records the worker group's metrics: rank 0."""
        return rank == 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def model_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of every parameter (to compare replicas across ranks)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        total += (p.detach().double().cpu().flatten() * (1 + (torch.arange(p.numel()) % 7))).sum() * (i + 1)
    return float(total)
