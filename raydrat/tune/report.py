"""The sweep's Pareto report: non-dominated trials on (val loss ↓, peak memory ↓, tokens/s ↑),
the best trial per memory tier, and the command that trains the chosen config at full length.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raydrat.bench.report import format_table
from raydrat.plots import pyplot

GB = 1024**3


@dataclass
class TrialRecord:
    """Everything the sweep knows about one trial (one ``--json`` record)."""

    trial: str
    params: dict[str, Any]
    status: str
    estimated_bytes: int | None
    val_loss: float | None = None
    metric_value: float | None = None
    """The trial's last value of the sweep's ``metric`` (what ``best`` ranks by)."""
    peak_bytes: int | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    micro_batch_size: int | None = None
    train_time_s: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)
    """Where the rest of the trial's time went (``time/...`` metrics: data set-up, the
    worker loop's wall time, its data waits, evaluation and checkpoint saves)."""
    wall_s: float | None = None
    start_ts: float | None = None
    end_ts: float | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int | None:
        """Memory figure used for ranking: the observed peak, else the estimate."""
        return self.peak_bytes or self.estimated_bytes

    def ranked(self) -> bool:
        return (
            self.status == "completed"
            and self.val_loss is not None
            and math.isfinite(self.val_loss)
            and self.memory_bytes is not None
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


def _dominates(a: TrialRecord, b: TrialRecord) -> bool:
    ka = (a.val_loss, a.memory_bytes, -(a.tokens_per_s or 0.0))
    kb = (b.val_loss, b.memory_bytes, -(b.tokens_per_s or 0.0))
    return all(x <= y for x, y in zip(ka, kb)) and any(x < y for x, y in zip(ka, kb))


def mark_pareto(records: list[TrialRecord]) -> list[TrialRecord]:
    """Set ``pareto`` on completed trials no other completed trial dominates; return them
    sorted by val loss."""
    ranked = [r for r in records if r.ranked()]
    for r in records:
        r.pareto = r.ranked() and not any(_dominates(o, r) for o in ranked if o is not r)
    return sorted((r for r in records if r.pareto), key=lambda r: r.val_loss)


def memory_tiers(budget_bytes: int | None, records: list[TrialRecord]) -> list[tuple[str, int]]:
    """Tier upper bounds: a quarter, half and all of the budget (or of the largest trial)."""
    ranked = [r.memory_bytes for r in records if r.ranked()]
    top = budget_bytes or (max(ranked) if ranked else 0)
    if not top:
        return []
    return [(f"<= {fmt_bytes(int(top * f))}", int(top * f)) for f in (0.25, 0.5, 1.0)]


def best_per_tier(records, tiers, mode: str = "min") -> list[tuple[str, TrialRecord | None]]:
    out = []
    for label, limit in tiers:
        fits = [r for r in records if r.ranked() and r.memory_bytes <= limit]
        out.append((label, min(fits, key=lambda r: r.val_loss) if fits else None))
    return out


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v, '.3g')}" for k, v in params.items())


HEADERS = ["trial", "status", "val_loss", "peak", "estimate", "tokens/s", "micro-batch", "pareto", "params"]


def table_rows(records: list[TrialRecord]) -> list[list[str]]:
    return [
        [
            r.trial, r.status, _fmt(r.val_loss), fmt_bytes(r.peak_bytes), fmt_bytes(r.estimated_bytes),
            _fmt(r.tokens_per_s, ",.0f"), _fmt(r.micro_batch_size), "*" if r.pareto else "",
            params_text(r.params),
        ]
        for r in records
    ]


def format_report(records, tiers_best, command: str | None) -> str:
    parts = ["All trials:", format_table(HEADERS, table_rows(records)), ""]
    front = [r for r in records if r.pareto]
    parts += ["Pareto front (val loss, peak memory, tokens/s):", format_table(HEADERS, table_rows(front)), ""]
    if tiers_best:
        parts.append("Best config per memory tier:")
        rows = [[label, r.trial if r else "-", _fmt(r.val_loss) if r else "-", params_text(r.params) if r else "none fits"]
                for label, r in tiers_best]
        parts += [format_table(["tier", "trial", "val_loss", "params"], rows), ""]
    if command:
        parts += ["Train the best config at full length:", f"  {command}"]
    return "\n".join(parts)


CSV_FIELDS = ["trial", "status", "val_loss", "peak_bytes", "estimated_bytes", "tokens_per_s", "micro_batch_size", "params"]


def write_pareto_csv(records: list[TrialRecord], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in sorted((r for r in records if r.pareto), key=lambda r: r.val_loss):
            w.writerow([r.trial, r.status, r.val_loss, r.peak_bytes, r.estimated_bytes, r.tokens_per_s,
                        r.micro_batch_size, params_text(r.params)])
    return path


def plot_pareto(records: list[TrialRecord], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranked = [r for r in records if r.ranked()]
    if ranked:
        sc = ax.scatter([r.memory_bytes / 1024**2 for r in ranked], [r.val_loss for r in ranked],
                        c=[r.tokens_per_s or 0 for r in ranked], cmap="viridis", s=50)
        fig.colorbar(sc, ax=ax, label="tokens/s")
        front = sorted((r for r in ranked if r.pareto), key=lambda r: r.memory_bytes)
        ax.scatter([r.memory_bytes / 1024**2 for r in front], [r.val_loss for r in front],
                   facecolors="none", edgecolors="red", s=160, label="Pareto front")
        for r in ranked:
            ax.annotate(r.trial, (r.memory_bytes / 1024**2, r.val_loss), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.legend()
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
