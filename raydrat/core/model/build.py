"""``build_model``: a :class:`GPT` from its config, seeded, on a device."""

from __future__ import annotations

import torch

from raydrat.config.model import ModelConfig
from raydrat.core.model.transformer import GPT


def build_model(cfg: ModelConfig, seed: int | None = None, device: torch.device | str | None = None) -> GPT:
    """A freshly initialised :class:`GPT` (``torch.manual_seed(seed)`` first when given),
    moved to ``device``. ``cfg.init_from`` is not read here: the weights of another run or
    an export are read by the run's setup
    (:func:`raydrat.core.setup.initial_model`). Techniques are applied afterwards,
    from outside (:func:`raydrat.core.techniques.bundle.apply_techniques`)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT(cfg)
    return model.to(device) if device is not None else model
