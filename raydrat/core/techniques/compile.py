"""``torch.compile`` as a technique (``train.compile``), applied after recomputation and
before the sync wrapper, in place so parameter names never change."""

from __future__ import annotations

from torch import nn

from raydrat.core.techniques.base import Technique


class Compile(Technique):
    name = "compile"

    def __init__(self, mode: str = "off"):
        self.mode = mode

    def apply(self, model: nn.Module) -> nn.Module:
        if self.mode != "off":
            model.compile(mode=self.mode)  # in place: state_dict keys unchanged
        return model
