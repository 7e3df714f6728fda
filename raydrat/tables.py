"""Tables and figures every report shares: a plain-text table, and figures written as JSON.

Used by the benchmarks (``raydrat bench``) and the sweep report (``raydrat tune``); it
imports nothing of raydrat, so any adapter may use it without depending on another.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown-style table with columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, figures: Any) -> Path:
    """Write ``figures`` as indented JSON (numpy scalars as floats), creating the folder, and
    say where."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    print(f"figures written to {p}")
    return p
