"""The whole run's config: one section per component, and the checks that span sections
(they need neither a model nor a machine; those live in :func:`raydrat.core.runtime.resolve`)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from raydrat.config.base import Section
from raydrat.config.compile import CompileConfig
from raydrat.config.data import DataConfig
from raydrat.config.dotted import flatten
from raydrat.config.model import ModelConfig
from raydrat.config.optim import OptimConfig
from raydrat.config.precision import PrecisionConfig
from raydrat.config.recompute import RecomputeConfig
from raydrat.config.scaling import ScalingConfig
from raydrat.config.slots import SlotsConfig
from raydrat.config.sync import SyncConfig
from raydrat.config.tracking import TrackingConfig
from raydrat.config.train import TrainConfig


class RaydratConfig(Section):
    name: str = "raydrat"
    """Name of the run (Ray Train run directory and default MLflow run name)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    recompute: RecomputeConfig = Field(default_factory=RecomputeConfig)
    slots: SlotsConfig = Field(default_factory=SlotsConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_cross(self) -> RaydratConfig:
        if self.train.min_micro_batch > self.train.batch_size:
            raise ValueError(
                f"train.min_micro_batch ({self.train.min_micro_batch}) exceeds train.batch_size "
                f"({self.train.batch_size}): lower train.min_micro_batch"
            )
        if self.optim.warmup_steps >= self.train.steps and self.train.steps > 1:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.steps "
                f"({self.train.steps}): lower optim.warmup_steps"
            )
        _check_slots(self.slots, self.model.n_layer)
        if self.sync.fragments > self.model.n_layer:
            raise ValueError(
                f"sync.fragments ({self.sync.fragments}) exceeds the model's {self.model.n_layer} blocks "
                f"(model.n_layer): a fragment is at least one block; lower sync.fragments"
            )
        if self.sync.mode == "fsdp":
            _check_fsdp(self)
        if self.sync.engine == "torchft" and self.scaling.num_workers < 2:
            raise ValueError(
                f"sync.engine=torchft with scaling.num_workers={self.scaling.num_workers}: a replica "
                "alone has no peer to sync with or to recover from; set scaling.num_workers to 2 or "
                "more, or remove sync.engine"
            )
        if self.sync.engine == "torchft":
            _check_torchft_saves(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"section.key": value}`` view (MLflow params, Tune spaces)."""
        return flatten(self.to_dict())


def _check_torchft_saves(cfg: RaydratConfig) -> None:
    """Under ``sync.engine: torchft`` the replicas report checkpoints right after a sync that
    every replica took part in: the save steps must be sync steps."""
    every = cfg.sync.sync_steps // cfg.sync.fragments
    for key, value in (("eval_every", cfg.train.eval_every), ("checkpoint_every", cfg.train.checkpoint_every)):
        if value and value % every:
            raise ValueError(
                f"train.{key}={value} with sync.engine=torchft must be a multiple of the steps between two "
                f"syncs (sync.sync_steps / sync.fragments = {every}): checkpoints are taken right after a sync "
                f"every replica took part in; set train.{key} to a multiple of {every}"
            )


def _check_fsdp(cfg: RaydratConfig) -> None:
    """What ``sync.mode=fsdp`` cannot honour in the other sections, naming both keys."""
    conflicts = [
        (
            cfg.slots.mode != "all",
            f"slots.mode={cfg.slots.mode}",
            "a skipped block would leave its shards out of the gradient reduce-scatter",
            "set slots.mode=all",
        ),
        (
            cfg.compile.enabled,
            f"compile.mode={cfg.compile.mode}",
            "compiling a sharded model is not supported here",
            "set compile.mode=off",
        ),
        (
            cfg.optim.name in ("adamw8bit", "paged_adamw8bit"),
            f"optim.name={cfg.optim.name}",
            "bitsandbytes' 8-bit states do not take sharded (DTensor) parameters",
            "use optim.name=adamw",
        ),
        (
            cfg.precision.mode == "fp16",
            "precision.mode=fp16",
            "fp16 loss scaling is not supported on sharded gradients here",
            "use precision.mode=bf16 or fp32",
        ),
        (
            cfg.precision.fallback != "none",
            f"precision.fallback={cfg.precision.fallback}",
            "the precision fallback is not supported on sharded gradients here",
            "set precision.fallback=none",
        ),
        (
            cfg.scaling.elastic,
            f"scaling.num_workers={list(cfg.scaling.num_workers) if cfg.scaling.elastic else ''} (elastic)",
            "its shards are laid out for one worker count",
            "give scaling.num_workers a fixed number",
        ),
        (
            cfg.train.auto_microbatch,
            "train.auto_microbatch=true",
            "a retry on one worker would desynchronise the shards' collectives",
            "set train.auto_microbatch=false",
        ),
    ]
    for hit, key, why, fix in conflicts:
        if hit:
            raise ValueError(f"sync.mode=fsdp cannot be combined with {key}: {why}; {fix} or set sync.mode=ddp")


def _check_slots(sc: SlotsConfig, n: int) -> None:
    """The slot settings against the model's layer count."""
    if sc.mode == "fixed":
        if not sc.fixed:
            raise ValueError("slots.mode=fixed needs slots.fixed, a list of layer indices")
        bad = sorted({i for i in sc.fixed if not 0 <= i < n})
        if bad:
            raise ValueError(f"slots.fixed has {bad} outside 0..{n - 1} (model.n_layer={n})")
        if len(set(sc.fixed)) != len(sc.fixed):
            raise ValueError(f"slots.fixed {sc.fixed} repeats a layer: list each layer once")
    max_slots = sc.max_slots or n
    if max_slots > n:
        raise ValueError(f"slots.max_slots ({max_slots}) exceeds model.n_layer ({n})")
    if sc.min_slots > max_slots:
        raise ValueError(f"slots.min_slots ({sc.min_slots}) exceeds slots.max_slots ({max_slots})")
    if sc.start_slots is not None and not sc.min_slots <= sc.start_slots <= max_slots:
        raise ValueError(
            f"slots.start_slots ({sc.start_slots}) must lie in [slots.min_slots, slots.max_slots] "
            f"= [{sc.min_slots}, {max_slots}]"
        )
