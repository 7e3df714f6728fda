"""Optimizer and learning-rate schedule (section ``optim:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydrat.config.base import Section


class OptimConfig(Section):
    name: Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit", "sgd"] = "adamw"
    """Optimizer. ``adamw``: torch AdamW (foreach). ``adamw_fused``: torch AdamW with
    ``fused=True`` (one kernel per step). ``adamw8bit`` / ``paged_adamw8bit``:
    bitsandbytes 8-bit AdamW (block-wise quantised moments: about 2 bytes of state per
    parameter instead of 8; tensors under 4096 elements keep 32-bit states); the paged
    variant pages its states to host memory under GPU pressure (plain 8-bit on CPU).
    ``sgd``: plain SGD (no momentum; ``weight_decay`` applied as L2), mainly for checking
    that sync strategies are equivalent."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate (after warmup)."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup length in optimizer steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay, applied to matrices only (not to norms, biases)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""

    @model_validator(mode="after")
    def _check_lr(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) exceeds optim.lr ({self.lr}): lower min_lr")
        return self
