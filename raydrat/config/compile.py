"""``torch.compile`` of the model (section ``compile:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from raydrat.config.base import Section


class CompileConfig(Section):
    mode: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """``torch.compile`` mode for the model (``model.compile(mode=...)``, in place: parameter
    names unchanged); ``off``: eager."""

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML reads a bare ``off`` as false: ``compile: {mode: off}`` means eager."""
        return "off" if value is False else value

    @property
    def enabled(self) -> bool:
        return self.mode != "off"
