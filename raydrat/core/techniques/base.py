"""What every technique is: applied to the model once, from outside, then consulted by the
training step through its own per-step hooks. Each also reports only the metrics that mean
something for the run, and saves what it learns or draws in checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Technique:
    """Base of the technique objects (recompute planner, slot schedule, precision, compile,
    sync strategy). Subclasses override what applies to them."""

    name: str = "technique"

    def apply(self, model: nn.Module) -> nn.Module:
        """Attach to ``model`` (in place or by wrapping it); return the model to train."""
        return model

    def metrics(self) -> dict[str, float]:
        """This step's figures (names from :mod:`raydrat.core.metrics`); only meaningful ones."""
        return {}

    def state_dict(self) -> dict:
        """What the technique learned or drew so far (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class StepPlan:
    """What one step runs: the active layers (``None``: the config's worst case) and, per
    branch of those layers in order (attention, MLP, attention, ...), whether it stores its
    activations (``None``: the config's plan). :func:`raydrat.core.memory.estimate.estimate_memory`
    predicts the peak of a step with this plan."""

    active: tuple[int, ...] | None = None
    stored: tuple[bool, ...] | None = None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (and compile) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
