"""What every benchmark prints beside its figures: the machine's load average, and a titled
table (the table itself and the JSON figures are :mod:`raydrat.tables`, shared with the
sweep report)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from raydrat.tables import format_table


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("n/a" where the system has none): printed beside
    every timing, since these benchmarks run on shared machines."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], footer: str = "") -> None:
    print(f"\n{title}\n")
    print(format_table(headers, rows))
    if footer:
        print(f"\n{footer}")
