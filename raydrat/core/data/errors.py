"""The one error type of :mod:`raydrat.core.data` and :mod:`raydrat.ray_data`."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem. The message is one line that names the file or config key at fault
    and says what to do about it."""
