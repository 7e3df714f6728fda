"""What every technique is: applied to the model once, from outside, then consulted by the
training step through its own per-step hooks. Each also reports only the metrics that mean
something for the run, and saves what it learns or draws in checkpoints."""

from __future__ import annotations

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
