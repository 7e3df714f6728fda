"""Plots for MLflow artifacts: loss curves and the gates' heat-map (matplotlib, loaded on
first use: it is an optional heavy dependency that only plotting needs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np


def pyplot():
    # matplotlib is heavy and only plotting needs it: imported here, with the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Mapping[str, Iterable[tuple[int, float]]], out_path: str | Path, title: str) -> Path:
    """A PNG of several ``(step, value)`` series on one axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        pts = sorted(points)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def gate_heatmap(
    history: list[tuple[int, list[float]]], branches: list[tuple[int, str]], path: str | Path
) -> Path | None:
    """PNG heat-map of gate probabilities (rows: branches, columns: recorded steps)."""
    if not history:
        return None
    plt = pyplot()
    steps = [s for s, _ in history]
    grid = np.array([p for _, p in history]).T
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(branches) + 1.5))
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(branches)), [f"L{layer} {kind}" for layer, kind in branches])
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_title("gate probability p (store activations)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
