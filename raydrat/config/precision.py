"""Numeric precision of the forward and backward pass (section ``precision:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydrat.config.base import Section


class PrecisionConfig(Section):
    """Parameters, gradients and optimizer states stay fp32 whatever the mode; only the
    forward/backward compute changes."""

    mode: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """``bf16``/``fp16`` run matmuls under ``torch.autocast``; ``fp16`` adds a
    ``GradScaler`` and needs a CUDA GPU. ``auto``: bf16 on a GPU that supports it, else
    fp16 on a GPU, else fp32."""
    fallback: Literal["none", "bf16", "fp32"] = "none"
    """Dynamic policy for fp16: after ``fallback_after`` consecutive overflow-skipped steps
    switch to this precision for ``fallback_steps`` steps (each switch is logged).
    ``none``: never switch."""
    fallback_after: int = Field(3, ge=1)
    """Consecutive fp16 overflow steps (GradScaler skips) that trigger the fallback."""
    fallback_steps: int = Field(100, ge=1)
    """Steps run in the fallback precision before fp16 is tried again."""
