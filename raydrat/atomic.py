"""Files replaced whole: a reader (another process, a resume after a crash) finds the old
content or the new, never half of either. The new content goes to a temporary file beside
the target, which a rename then puts in its place (atomic within one filesystem); a write
that fails leaves the target as it was and no temporary file behind.

Imports nothing of raydrat: every layer may use it (``tests/test_layers.py``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new content to; when the block
    ends without an error it replaces ``path`` (flushed to disk first if ``durable``). On an
    error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # unique to this thread
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) whole; returns the path."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
