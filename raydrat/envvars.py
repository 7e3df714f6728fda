"""An environment variable set for a block and restored after (removed if it was unset)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def env_set(key: str, value: str | None) -> Iterator[None]:
    """``$key`` is ``value`` inside the block (``None``: left as it is), then as it was."""
    saved = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
