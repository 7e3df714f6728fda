"""The sweep's report: every trial (status, steps, figures, estimated and measured peak),
the Pareto front of completed trials on (val loss ↓, measured peak ↓, tokens/s ↑), the best
trial per memory tier (by measured peak), the estimate's largest error, the trials whose
measured peak exceeded the budget they were admitted under, and the command that trains the
chosen config at full length; as text, a CSV of every trial and a plot.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raydrat.plots import pyplot
from raydrat.tables import format_table

GB = 1024**3
MIB = 1024**2


@dataclass
class TrialRecord:
    """Everything the sweep knows about one trial (one ``--json`` record)."""

    trial: str
    params: dict[str, Any]
    status: str
    estimated_bytes: int | None
    """The predicted peak it was admitted (or refused) with."""
    budget_bytes: int | None = None
    """The memory budget it was admitted (or refused) under."""
    val_loss: float | None = None
    metric_value: float | None = None
    """The trial's last value of the sweep's ``metric`` (what ``best`` ranks by)."""
    peak_bytes: int | None = None
    """The measured peak of its training worker."""
    tokens_per_s: float | None = None
    steps: int | None = None
    """Steps trained (the last one it reported)."""
    train_steps: int | None = None
    """Steps it was configured for (``train.steps``)."""
    micro_batch_size: int | None = None
    train_time_s: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)
    """Where the rest of the trial's time went (``system/...`` metrics: data set-up, the
    worker loop's wall time, its data waits, evaluation and checkpoint saves)."""
    wall_s: float | None = None
    start_ts: float | None = None
    end_ts: float | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    """Why it failed (the root cause), or why admission refused it."""
    launched: bool = True
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def estimate_error(self) -> float | None:
        """Measured peak over the estimate, minus one (+0.10: 10% more than predicted)."""
        if not self.peak_bytes or not self.estimated_bytes:
            return None
        return self.peak_bytes / self.estimated_bytes - 1

    @property
    def over_budget(self) -> bool:
        """Admitted under the budget, but its measured peak exceeded it."""
        return bool(self.launched and self.budget_bytes and self.peak_bytes and self.peak_bytes > self.budget_bytes)

    def finished(self) -> bool:
        return self.status == "completed" and self.val_loss is not None and math.isfinite(self.val_loss)

    def ranked(self) -> bool:
        """On the Pareto front's and the tiers' terms: completed, with a measured peak."""
        return self.finished() and self.peak_bytes is not None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra, estimate_error=self.estimate_error, over_budget=self.over_budget)
        return d


def _key(r: TrialRecord) -> tuple:
    return (r.val_loss, r.peak_bytes, -(r.tokens_per_s or 0.0))


def _dominates(a: TrialRecord, b: TrialRecord) -> bool:
    ka, kb = _key(a), _key(b)
    return all(x <= y for x, y in zip(ka, kb)) and any(x < y for x, y in zip(ka, kb))


def mark_pareto(records: list[TrialRecord]) -> list[TrialRecord]:
    """Set ``pareto`` on completed trials no other completed trial dominates (by measured
    peak); return them sorted by val loss."""
    ranked = [r for r in records if r.ranked()]
    for r in records:
        r.pareto = r.ranked() and not any(_dominates(o, r) for o in ranked if o is not r)
    return sorted((r for r in records if r.pareto), key=lambda r: r.val_loss)


def memory_tiers(budget_bytes: int | None, records: list[TrialRecord]) -> list[tuple[str, int]]:
    """Tier upper bounds: a quarter, half and all of the budget (or of the largest measured peak)."""
    ranked = [r.peak_bytes for r in records if r.ranked()]
    top = budget_bytes or (max(ranked) if ranked else 0)
    if not top:
        return []
    return [(f"<= {fmt_bytes(int(top * f))}", int(top * f)) for f in (0.25, 0.5, 1.0)]


def best_per_tier(records, tiers, mode: str = "min") -> list[tuple[str, TrialRecord | None]]:
    out = []
    for label, limit in tiers:
        fits = [r for r in records if r.ranked() and r.peak_bytes <= limit]
        out.append((label, min(fits, key=lambda r: r.val_loss) if fits else None))
    return out


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", GB), ("MB", MIB), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v, '.3g')}" for k, v in params.items())


HEADERS = [
    "trial",
    "status",
    "steps",
    "val_loss",
    "peak",
    "estimate",
    "est. error",
    "tokens/s",
    "micro-batch",
    "pareto",
    "params",
]


def _steps(r: TrialRecord) -> str:
    if r.steps is None:
        return "-"
    return f"{r.steps}/{r.train_steps}" if r.train_steps else str(r.steps)


def table_rows(records: list[TrialRecord]) -> list[list[str]]:
    return [
        [
            r.trial,
            r.status,
            _steps(r),
            _fmt(r.val_loss),
            fmt_bytes(r.peak_bytes) + (" !" if r.over_budget else ""),
            fmt_bytes(r.estimated_bytes),
            "-" if r.estimate_error is None else f"{r.estimate_error:+.0%}",
            _fmt(r.tokens_per_s, ",.0f"),
            _fmt(r.micro_batch_size),
            "*" if r.pareto else "",
            params_text(r.params),
        ]
        for r in records
    ]


def format_report(
    records: list[TrialRecord], tiers_best, command: str | None, budget: int | None, memory: dict[str, Any]
) -> str:
    parts = [
        "All trials (peak: measured; estimate: predicted at admission):",
        format_table(HEADERS, table_rows(records)),
    ]
    over = [r for r in records if r.over_budget]
    if over:
        parts.append(
            f"! measured peak above the memory budget it was admitted under ({fmt_bytes(budget)}): "
            + ", ".join(r.trial for r in over)
        )
    for r in records:
        if r.error:
            parts.append(f"{r.trial} {r.status}{' (not launched)' if not r.launched else ''}: {r.error}")
    if memory.get("max_estimate_error") is not None:
        r = next(x for x in records if x.trial == memory["max_estimate_error_trial"])
        parts.append(
            f"Largest estimate error: {r.trial}, measured {fmt_bytes(r.peak_bytes)} against an estimate of "
            f"{fmt_bytes(r.estimated_bytes)} ({r.estimate_error:+.0%})"
        )
    parts.append("")
    front = [r for r in records if r.pareto]
    parts += ["Pareto front (val loss, measured peak, tokens/s):", format_table(HEADERS, table_rows(front)), ""]
    if tiers_best:
        parts.append("Best config per memory tier (measured peak):")
        rows = [
            [
                label,
                r.trial if r else "-",
                _fmt(r.val_loss) if r else "-",
                fmt_bytes(r.peak_bytes) if r else "-",
                params_text(r.params) if r else "none fits",
            ]
            for label, r in tiers_best
        ]
        parts += [format_table(["tier", "trial", "val_loss", "peak", "params"], rows), ""]
    if command:
        parts += ["Train the best config at full length:", f"  {command}"]
    return "\n".join(parts)


CSV_FIELDS = [
    "trial",
    "status",
    "steps",
    "train_steps",
    "val_loss",
    "metric_value",
    "peak_bytes",
    "estimated_bytes",
    "estimate_error",
    "budget_bytes",
    "over_budget",
    "tokens_per_s",
    "micro_batch_size",
    "pareto",
    "launched",
    "wall_s",
    "mlflow_run_id",
    "error",
    "params",
]


def write_trials_csv(records: list[TrialRecord], path: Path) -> Path:
    """Every trial, one row each (``pareto`` marks the front)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in records:
            d = r.to_json()
            w.writerow([params_text(r.params) if k == "params" else ("" if d[k] is None else d[k]) for k in CSV_FIELDS])
    return path


def plot_pareto(records: list[TrialRecord], path: Path, title: str, budget: int | None) -> Path:
    """Every trial on (peak memory, val loss): completed (coloured by tokens/s) and stopped
    ones at their measured peak and last val loss, the front ringed and joined; the others
    (infeasible, out of memory, failed) hollow at their estimate in a band above the rest;
    the budget as a vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    trained = [
        r
        for r in records
        if r.status in ("completed", "stopped_early")
        and r.peak_bytes
        and r.val_loss is not None
        and math.isfinite(r.val_loss)
    ]
    losses = [r.val_loss for r in trained]
    top = (max(losses) + 0.15 * (max(losses) - min(losses) + 0.1)) if losses else 1.0
    done = [r for r in trained if r.status == "completed"]
    stopped = [r for r in trained if r.status == "stopped_early"]
    if done:
        sc = ax.scatter(
            [r.peak_bytes / MIB for r in done],
            [r.val_loss for r in done],
            c=[r.tokens_per_s or 0 for r in done],
            cmap="viridis",
            s=60,
            label="completed (measured peak)",
            zorder=3,
        )
        fig.colorbar(sc, ax=ax, label="tokens/s")
    if stopped:
        ax.scatter(
            [r.peak_bytes / MIB for r in stopped],
            [r.val_loss for r in stopped],
            marker="v",
            s=60,
            color="tab:gray",
            label="stopped early (measured peak, last val loss)",
            zorder=3,
        )
    front = sorted((r for r in records if r.pareto), key=lambda r: r.peak_bytes)
    if front:
        ax.plot([r.peak_bytes / MIB for r in front], [r.val_loss for r in front], color="red", lw=1, zorder=2)
        ax.scatter(
            [r.peak_bytes / MIB for r in front],
            [r.val_loss for r in front],
            facecolors="none",
            edgecolors="red",
            s=200,
            lw=1.5,
            label="Pareto front",
            zorder=4,
        )
    untrained = [r for r in records if r not in trained and r.estimated_bytes]
    for status, marker, color in (
        ("infeasible", "o", "tab:orange"),
        ("oom", "s", "tab:red"),
        ("failed", "D", "tab:purple"),
    ):
        group = [r for r in untrained if r.status == status]
        if group:
            ax.scatter(
                [r.estimated_bytes / MIB for r in group],
                [top] * len(group),
                marker=marker,
                s=70,
                facecolors="none",
                edgecolors=color,
                lw=1.5,
                label=f"{status} (estimate; no val loss)",
                zorder=3,
            )
    for r in trained:
        ax.annotate(r.trial, (r.peak_bytes / MIB, r.val_loss), fontsize=7, xytext=(8, 6), textcoords="offset points")
    for r in untrained:
        ax.annotate(r.trial, (r.estimated_bytes / MIB, top), fontsize=7, xytext=(5, 4), textcoords="offset points")
    if budget:
        ax.axvline(budget / MIB, color="black", ls="--", lw=1, label=f"memory budget {fmt_bytes(budget)}")
    if untrained:
        ax.axhline(top, color="0.85", lw=6, zorder=1)
    ax.set_xlabel("peak memory per worker (MB): measured, or the estimate for trials that did not train")
    ax.set_ylabel("val loss (last reported)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
