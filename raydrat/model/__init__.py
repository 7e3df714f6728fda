"""The transformer and the techniques applied to it from outside."""

from raydrat.model.recompute import apply_recompute
from raydrat.model.transformer import GPT

__all__ = ["GPT", "apply_recompute"]
