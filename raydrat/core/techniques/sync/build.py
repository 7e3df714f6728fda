"""The sync strategy a run's ``sync:`` section asks for."""

from __future__ import annotations

from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.sync.ddp import DDPStrategy
from raydrat.core.techniques.sync.fsdp import FSDPStrategy
from raydrat.core.techniques.sync.local import LocalStrategy
from raydrat.core.techniques.sync.strategy import SyncStrategy
from raydrat.core.techniques.sync.torchft_local import TorchftStrategy


def build_strategy(cfg: SyncConfig, world_size: int, skips_layers: bool = False) -> SyncStrategy:
    """The strategy for ``sync.mode``; with one worker, plain training. ``skips_layers``:
    some steps leave parameters without gradients (``slots.mode`` other than ``all``), so
    DDP must look for unused parameters whatever ``sync.find_unused_parameters`` says.
    ``sync.engine: torchft``: ``world_size`` is the number of replica groups."""
    if world_size <= 1:
        return SyncStrategy(cfg, world_size)
    if cfg.mode == "fsdp":
        return FSDPStrategy(cfg, world_size)
    if cfg.mode == "ddp":
        if skips_layers and not cfg.find_unused_parameters:
            cfg = cfg.model_copy(update={"find_unused_parameters": True})
        return DDPStrategy(cfg, world_size)
    if cfg.engine == "torchft":
        return TorchftStrategy(cfg, world_size)
    return LocalStrategy(cfg, world_size)
