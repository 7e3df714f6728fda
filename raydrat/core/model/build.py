"""``build_model``: a :class:`GPT` from its config, seeded, on a device."""

from __future__ import annotations

import torch

from raydrat.core.model.config import ModelConfig
from raydrat.core.model.load import init_state
from raydrat.core.model.transformer import GPT


def build_model(cfg: ModelConfig, seed: int | None = None, device: torch.device | str | None = None) -> GPT:
    """A freshly initialised :class:`GPT` (``torch.manual_seed(seed)`` first when given),
    moved to ``device``; with ``cfg.init_from`` it starts from those weights
    (:func:`raydrat.core.model.load.init_state`). Techniques are applied afterwards, from outside
    (:func:`raydrat.core.techniques.apply_techniques`)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT(cfg)
    if cfg.init_from:
        model.load_state_dict(init_state(cfg.init_from, cfg))
    return model.to(device) if device is not None else model
