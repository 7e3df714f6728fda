"""How the workers synchronise (section ``sync:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydrat.config.base import Section


class SyncConfig(Section):
    """How the Ray Train workers synchronise (see docs/distributed.md)."""

    mode: Literal["ddp", "local"] = "ddp"
    """``ddp``: gradients all-reduced every optimizer step (PyTorch DDP). ``local``: each
    worker takes ``sync_steps`` optimizer steps on its own shard, then parameters are
    averaged across workers (local SGD; DiLoCo with ``outer_optimizer``)."""
    sync_steps: int = Field(1, ge=1)
    """``local`` only: optimizer steps between parameter averages."""
    average_optimizer_state: bool = False
    """``local`` only: also average the optimizer's floating-point state (e.g. AdamW
    moments) at each sync; otherwise it stays local to each worker."""
    outer_optimizer: Literal["none", "nesterov"] = "none"
    """``local`` only: ``nesterov`` treats the averaged change since the last sync as a
    pseudo-gradient for an outer SGD with Nesterov momentum (DiLoCo)."""
    outer_lr: float = Field(0.7, gt=0)
    """Learning rate of the outer optimizer."""
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    """Nesterov momentum of the outer optimizer."""
    bucket_cap_mb: float | None = Field(None, gt=0)
    """``ddp`` only: DDP gradient bucket size in MB (``None``: PyTorch's default, 25)."""
    find_unused_parameters: bool = False
    """``ddp`` only: let DDP tolerate parameters without gradients in a step (always on
    when ``slots.mode`` is not ``all``: skipped layers get no gradients)."""
    latency_s: float = Field(0.0, ge=0)
    """Extra delay before each collective, simulating a slow link (benchmarks)."""

    @model_validator(mode="after")
    def _check_mode(self) -> "SyncConfig":
        set_fields = self.model_fields_set
        if self.mode == "local":
            ddp_only = sorted(k for k in ("bucket_cap_mb", "find_unused_parameters") if k in set_fields
                              and getattr(self, k) != type(self).model_fields[k].default)
            if ddp_only:
                raise ValueError(
                    f"sync.{', sync.'.join(ddp_only)} only apply to sync.mode=ddp: remove them or "
                    "set sync.mode=ddp"
                )
        else:
            local_only = sorted(
                k for k in ("sync_steps", "average_optimizer_state", "outer_optimizer")
                if getattr(self, k) != type(self).model_fields[k].default
            )
            if local_only:
                raise ValueError(
                    f"sync.{', sync.'.join(local_only)} only apply to sync.mode=local: set "
                    "sync.mode=local or remove them"
                )
        return self
