"""Precision: autocast, the fp16 GradScaler, and the dynamic fp16 fallback.

Parameters, gradients and optimizer states stay fp32; ``bf16``/``fp16`` run the forward
under ``torch.autocast``. ``fp16`` scales the loss with a ``GradScaler``; a step whose
gradients overflow is skipped by the scaler. With ``precision.fallback`` set, after
``precision.fallback_after`` consecutive skipped steps the policy switches to the fallback
precision for ``precision.fallback_steps`` steps, then tries fp16 again; each switch is
recorded in ``switches``.
"""

from __future__ import annotations

import contextlib

import torch

from raydrat.config.precision import PrecisionConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision(Technique):
    """The step's numeric precision; ``precision`` is resolved (never ``auto``)."""

    name = "precision"

    def __init__(
        self,
        precision: str,
        device: torch.device,
        fallback: str = "none",
        fallback_after: int = 3,
        fallback_steps: int = 100,
    ):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r} (resolve 'auto' first)")
        self.base = self.current = precision
        self.device = device
        self.fallback, self.fallback_after, self.fallback_steps = fallback, fallback_after, fallback_steps
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.skipped_in_row = 0
        self.skipped_total = 0
        self._fallback_until: int | None = None
        self.switches: list[tuple[int, str, str]] = []

    @classmethod
    def from_config(cls, cfg: PrecisionConfig, resolved: str, device: torch.device) -> Precision:
        """The ``precision:`` section's policy at ``resolved``, the mode the runtime resolved
        ``cfg.mode`` to (:attr:`raydrat.core.runtime.Runtime.precision`: never ``auto``)."""
        return cls(resolved, device, cfg.fallback, cfg.fallback_after, cfg.fallback_steps)

    def state_dict(self) -> dict:
        """The current precision, fallback counters and switches, and the GradScaler's state."""
        return {
            "current": self.current,
            "skipped_in_row": self.skipped_in_row,
            "skipped_total": self.skipped_total,
            "fallback_until": self._fallback_until,
            "switches": list(self.switches),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.current = state["current"]
        self.skipped_in_row, self.skipped_total = state["skipped_in_row"], state["skipped_total"]
        self._fallback_until = state["fallback_until"]
        self.switches = list(state["switches"])
        if self.scaler is not None and state["scaler"]:  # empty before the scaler's first step
            self.scaler.load_state_dict(state["scaler"])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.scaler is not None:
            out[M.OVERFLOW_STEPS] = float(self.skipped_total)
        if self.switches:
            out[M.PRECISION_SWITCHES] = float(len(self.switches))
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.current == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.current])

    @property
    def scaling(self) -> bool:
        return self.current == "fp16" and self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaling else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaling:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step (through the scaler in fp16). Returns False when the step was skipped."""
        if not self.scaling:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < before
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0
        self.skipped_total += int(skipped)
        return not skipped

    def after_step(self, step: int) -> str | None:
        """Apply the fallback policy after optimizer step ``step``; returns a message on a switch."""
        if self._fallback_until is not None and step + 1 >= self._fallback_until:
            self._switch(step, self.base)
            self._fallback_until = None
            return f"step {step + 1}: precision back to {self.base}"
        if self.fallback != "none" and self.current == "fp16" and self.skipped_in_row >= self.fallback_after:
            self._switch(step, self.fallback)
            self._fallback_until = step + 1 + self.fallback_steps
            self.skipped_in_row = 0
            return (
                f"step {step + 1}: {self.fallback_after} fp16 overflow steps in a row, "
                f"precision {self.fallback} for {self.fallback_steps} steps"
            )
        return None

    def _switch(self, step: int, to: str) -> None:
        self.switches.append((step + 1, self.current, to))
        self.current = to
