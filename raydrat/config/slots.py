"""Which transformer layers (slots) run each training step (section ``slots:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydrat.config.base import Section


class SlotsConfig(Section):
    """Which transformer layers (slots) run each training step. Evaluation always runs all."""

    mode: Literal["all", "layerdrop", "progressive", "adaptive", "fixed"] = "all"
    """``all``; ``layerdrop``: each layer kept with probability ``keep``; ``progressive``:
    keep probability decays from 1 toward ``floor`` over training, deeper layers dropped
    more; ``adaptive``: more slots when the loss plateaus, fewer under memory pressure,
    within [``min_slots``, ``max_slots``]; ``fixed``: the layers in ``fixed``."""
    keep: float = Field(0.5, gt=0, le=1)
    """Keep probability per layer (layerdrop). Must be in (0, 1]."""
    floor: float = Field(0.5, gt=0, le=1)
    """Final keep probability of the deepest layer (progressive). Must be in (0, 1]."""
    decay: float = Field(5.0, gt=0)
    """Progressive: global keep ``theta(t) = (1 - floor) * exp(-decay * t / steps) + floor``."""
    fixed: list[int] | None = None
    """Layer indices to run (fixed)."""
    min_slots: int = Field(1, ge=1)
    """Adaptive: fewest active layers."""
    max_slots: int | None = Field(None, ge=1)
    """Adaptive: most active layers (``None``: model.n_layer)."""
    start_slots: int | None = Field(None, ge=1)
    """Adaptive: active layers at the start (``None``: min_slots)."""
    patience: int = Field(20, ge=1)
    """Adaptive: steps without a relative loss improvement of ``plateau_tol`` that count as a plateau."""
    plateau_tol: float = Field(0.01, ge=0)
    """Adaptive: relative improvement of the smoothed loss below which it has plateaued."""
    memory_limit_mb: float | None = Field(None, gt=0)
    """Adaptive: drop a slot when measured activation MB exceed this (``None``: no limit)."""
