"""What every config section shares: unknown keys are errors, assignments are validated,
and one error type whose message names the key and the fix."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def changed_fields(section: BaseModel, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` whose value differs from the field's default."""
    fields = type(section).model_fields
    return sorted(k for k in names if getattr(section, k) != fields[k].get_default(call_default_factory=True))
