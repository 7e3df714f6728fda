"""``torch.compile`` as a technique (section ``compile:``), applied after recomputation and
before the sync wrapper, in place so parameter names never change."""

from __future__ import annotations

from torch import nn

from raydrat.config.compile import CompileConfig
from raydrat.core.techniques.base import Technique


class Compile(Technique):
    name = "compile"

    def __init__(self, cfg: CompileConfig | None = None):
        self.cfg = cfg or CompileConfig()

    @property
    def mode(self) -> str:
        return self.cfg.mode

    def apply(self, model: nn.Module) -> nn.Module:
        if self.cfg.enabled:
            model.compile(mode=self.cfg.mode)  # in place: state_dict keys unchanged
        return model
